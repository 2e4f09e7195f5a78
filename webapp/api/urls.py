from django.urls import path

from webapp.api import exports, files, fine_tuning, openapi, views

urlpatterns = [
    path("v1/models", views.list_models, name="api_models"),
    path("v1/models/<path:model>", views.retrieve_model, name="api_model"),
    path("v1/chat/completions", views.chat_completions, name="api_chat"),
    path("v1/embeddings", views.embeddings, name="api_embeddings"),
    path("v1/rerank", views.rerank, name="api_rerank"),
    path("v1/classify", views.classify, name="api_classify"),
    path("v1/files", files.files, name="api_files"),
    path("v1/files/<str:file>", files.one_file, name="api_file"),
    path("v1/files/<str:file>/content", files.file_content, name="api_file_content"),
    path("v1/fine_tuning/jobs", fine_tuning.jobs, name="api_fine_tuning_jobs"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job>", fine_tuning.one_job, name="api_fine_tuning_job"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job>/cancel", fine_tuning.cancel, name="api_fine_tuning_cancel"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job>/events", fine_tuning.events, name="api_fine_tuning_events"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job>/checkpoints", fine_tuning.checkpoints, name="api_fine_tuning_checkpoints"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job>/exports", exports.job_exports, name="api_fine_tuning_exports"),
    path("v1/exports/<str:export>/content", exports.export_content, name="api_export_content"),
    path("v1/openapi.json", openapi.description, name="api_openapi"),
    path("jobs/<int:job_id>/try/base/", views.try_job, {"which": "base"}, name="try_base"),
    path("jobs/<int:job_id>/try/tuned/", views.try_job, {"which": "tuned"}, name="try_tuned"),
]
