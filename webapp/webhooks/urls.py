from django.urls import path

from webapp.webhooks import views

urlpatterns = [
    path("account/webhook/", views.save_endpoint, name="save_webhook"),
    path("account/webhook/secret/", views.regenerate_secret, name="regenerate_webhook_secret"),
    path("account/webhook/remove/", views.remove_endpoint, name="remove_webhook"),
    path("account/webhook/test/", views.send_test_event, name="test_webhook"),
    path("account/webhook/deliveries/<int:delivery_id>/", views.delivery, name="webhook_delivery"),
    path("account/webhook/deliveries/<int:delivery_id>/retry/", views.retry_delivery, name="retry_webhook_delivery"),
]
