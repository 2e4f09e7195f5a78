from django.urls import path

from webapp.api import views

urlpatterns = [
    path("v1/models", views.list_models, name="api_models"),
    path("v1/models/<path:model>", views.retrieve_model, name="api_model"),
]
