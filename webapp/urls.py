from django.urls import include, path

urlpatterns = [
    path("", include("webapp.accounts.urls")),
    path("", include("webapp.datasets.urls")),
    path("", include("webapp.jobs.urls")),
    path("", include("webapp.api.urls")),
    path("", include("webapp.webhooks.urls")),
    path("", include("webapp.exports.urls")),
]
