from django.urls import path

from webapp.jobs import sse, views

urlpatterns = [
    path("", views.home, name="home"),
    path("jobs/new/", views.new_job, name="new_job"),
    path("jobs/compare/", views.compare, name="compare_jobs"),
    path("jobs/groups/<int:group_id>/", views.job_group, name="job_group"),
    path("jobs/groups/<int:group_id>/status/", views.job_group_status, name="job_group_status"),
    path("jobs/groups/<int:group_id>/cancel/", views.cancel_job_group, name="cancel_job_group"),
    path("jobs/<int:job_id>/", views.job_detail, name="job"),
    path("jobs/<int:job_id>/events/", sse.job_events, name="job_events"),
    path("jobs/<int:job_id>/cancel/", views.cancel_job, name="cancel_job"),
    path("jobs/<int:job_id>/download/", views.download, name="download"),
    path("jobs/<int:job_id>/checkpoints/<int:step>/download/", views.download_checkpoint, name="download_checkpoint"),
    path("jobs/<int:evaluation_id>/rows/", views.evaluation_rows, name="evaluation_rows"),
    path("jobs/<int:evaluation_id>/rows.csv", views.evaluation_csv, name="evaluation_csv"),
    path("datasets/<int:dataset_id>/evaluate/", views.evaluate_dataset, name="evaluate_dataset"),
]
