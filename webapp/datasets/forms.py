from pathlib import Path

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from webapp.datasets.models import Dataset

ALLOWED_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class UploadForm(forms.Form):
    file = forms.FileField(help_text=f"{', '.join(ALLOWED_EXTENSIONS)} · UTF-8")
    name = forms.CharField(max_length=200, required=False, help_text="Optional; the file name if empty.")
    task = forms.ChoiceField(choices=Dataset.TASKS, initial="sft")

    def clean_file(self):
        upload = self.cleaned_data["file"]
        suffix = Path(upload.name).suffix.lower()
        if suffix not in ALLOWED_EXTENSIONS:
            raise forms.ValidationError(
                f"{suffix or 'A file without an extension'} is not a dataset format we read; "
                f"upload one of {', '.join(ALLOWED_EXTENSIONS)}."
            )
        if upload.size > settings.MAX_UPLOAD_BYTES:
            raise forms.ValidationError(f"The file is larger than the limit of {filesizeformat(settings.MAX_UPLOAD_BYTES)}.")
        return upload
