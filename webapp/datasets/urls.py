from django.urls import path

from webapp.datasets import report_views, views

urlpatterns = [
    path("datasets/", views.dataset_list, name="datasets"),
    path("datasets/upload/", views.upload, name="upload_dataset"),
    path("datasets/samples/<slug:task>/", views.use_sample, name="use_sample"),
    path("datasets/<int:dataset_id>/", views.dataset_detail, name="dataset"),
    path("datasets/<int:dataset_id>/delete/", views.delete, name="delete_dataset"),
    path("datasets/<int:dataset_id>/status/", views.dataset_status, name="dataset_status"),
    path("datasets/<int:dataset_id>/mapping/", views.change_mapping, name="dataset_mapping"),
    path("datasets/<int:dataset_id>/columns/", views.choose_columns, name="dataset_columns"),
    path("datasets/<int:dataset_id>/media/", views.choose_media, name="dataset_media"),
    path("datasets/<int:dataset_id>/accept/", views.accept_rows, name="accept_dataset_rows"),
    path("datasets/<int:dataset_id>/replace/", views.replace_file, name="replace_dataset_file"),
    path("datasets/<int:dataset_id>/validation/", views.add_validation, name="add_validation_file"),
    path("datasets/<int:dataset_id>/validation/remove/", views.remove_validation, name="remove_validation_file"),
    path("datasets/<int:dataset_id>/quality/", report_views.dataset_quality, name="dataset_quality"),
]
