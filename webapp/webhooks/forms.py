from django import forms
from django.core.validators import URLValidator

from webapp.webhooks.models import SCHEMES, Endpoint

NOT_HTTP = "Enter an http:// or https:// address, such as https://example.com/hooks/specialist."


class HttpUrlField(forms.URLField):
    default_error_messages = {"invalid": NOT_HTTP}
    default_validators = [URLValidator(schemes=SCHEMES, message=NOT_HTTP)]


class EndpointForm(forms.ModelForm):
    url = HttpUrlField(
        label="Endpoint URL", max_length=2000, assume_scheme="https",
        help_text="Your server's address that receives a POST when one of your jobs succeeds, fails or is cancelled.",
    )

    class Meta:
        model = Endpoint
        fields = ["url"]
