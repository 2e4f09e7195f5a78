from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webapp.webhooks"

    def ready(self) -> None:
        from webapp.webhooks import receivers  # noqa: F401  (connects the job_finished receiver)
