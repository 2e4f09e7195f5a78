from django.urls import path

from webapp.api import views

urlpatterns = [
    path("v1/models", views.list_models, name="api_models"),
    path("v1/models/<path:model>", views.retrieve_model, name="api_model"),
    path("v1/chat/completions", views.chat_completions, name="api_chat"),
    path("v1/embeddings", views.embeddings, name="api_embeddings"),
    path("v1/rerank", views.rerank, name="api_rerank"),
    path("v1/classify", views.classify, name="api_classify"),
    path("jobs/<int:job_id>/try/base/", views.try_job, {"which": "base"}, name="try_base"),
    path("jobs/<int:job_id>/try/tuned/", views.try_job, {"which": "tuned"}, name="try_tuned"),
]
