from django.urls import path

from webapp.exports import views

urlpatterns = [
    path("jobs/<int:job_id>/exports/", views.request_export, name="request_export"),
    path("exports/<int:export_id>/download/", views.download_export, name="download_export"),
]
