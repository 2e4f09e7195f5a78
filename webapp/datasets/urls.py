from django.urls import path

from webapp.datasets import views

urlpatterns = [
    path("datasets/", views.dataset_list, name="datasets"),
    path("datasets/upload/", views.upload, name="upload_dataset"),
    path("datasets/samples/<slug:task>/", views.use_sample, name="use_sample"),
    path("datasets/<int:dataset_id>/", views.dataset_detail, name="dataset"),
    path("datasets/<int:dataset_id>/delete/", views.delete, name="delete_dataset"),
]
