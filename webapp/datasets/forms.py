from pathlib import Path

from django import forms
from django.conf import settings
from django.template.defaultfilters import filesizeformat

from webapp.datasets.models import Dataset
from worker.families import FAMILIES

DOCUMENT_EXTENSIONS = (".txt", ".md", ".zip")
"""Plain-text documents (a .zip of them): raw text for domain adaptation, one document each."""
ALLOWED_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", *DOCUMENT_EXTENSIONS)
FILE_HELP = f"{', '.join(ALLOWED_EXTENSIONS)} · UTF-8"


def check_upload(upload):
    """The upload if its name and size can be a dataset; a ValidationError that says why not."""
    suffix = Path(upload.name).suffix.lower()
    if suffix not in ALLOWED_EXTENSIONS:
        raise forms.ValidationError(
            f"{suffix or 'A file without an extension'} is not a dataset format we read; "
            f"upload one of {', '.join(ALLOWED_EXTENSIONS)}."
        )
    if upload.size > settings.MAX_UPLOAD_BYTES:
        raise forms.ValidationError(
            f"The file is larger than the limit of {filesizeformat(settings.MAX_UPLOAD_BYTES)}."
        )
    return upload


class UploadForm(forms.Form):
    file = forms.FileField(help_text=FILE_HELP)
    name = forms.CharField(max_length=200, required=False, help_text="Optional; the file name if empty.")
    task = forms.ChoiceField(choices=Dataset.TASKS, initial="sft")
    validation_file = forms.FileField(
        required=False,
        label="Validation file (optional)",
        help_text="Your own held-out rows, in the same format; without one, each job holds out a share of the rows.",
    )

    def clean_file(self):
        return check_upload(self.cleaned_data["file"])

    def clean_validation_file(self):
        upload = self.cleaned_data["validation_file"]
        return check_upload(upload) if upload else None

    def clean(self):
        data = super().clean()
        task = data.get("task")
        for name in ("file", "validation_file"):
            upload = data.get(name)
            suffix = Path(upload.name).suffix.lower() if upload else ""
            if suffix in DOCUMENT_EXTENSIONS and task and task != "domain":
                self.add_error(name, f"A {suffix} file holds plain documents, which train domain adaptation only; choose "
                               f"that task, or upload rows (JSONL, CSV, Parquet) for {FAMILIES[task].in_a_sentence}.")
        return data


class FileForm(forms.Form):
    """One file for an existing dataset: a corrected file in place, or its validation file."""

    file = forms.FileField(help_text=FILE_HELP)

    def clean_file(self):
        return check_upload(self.cleaned_data["file"])


class MappingForm(forms.Form):
    """One select per canonical field of the dataset's task: which column holds it."""

    def __init__(self, *args, dataset: Dataset, **kwargs):
        super().__init__(*args, **kwargs)
        choices = [("", "— not in the file —"), *((column, column) for column in dataset.columns)]
        for required, names in ((True, dataset.fields["required"]), (False, dataset.fields["optional"])):
            for name in names:
                self.fields[name] = forms.ChoiceField(
                    choices=choices,
                    required=required,
                    initial=dataset.mapping.get(name, ""),
                    help_text="required" if required else "optional",
                    error_messages={"required": f"Choose the column that holds the {name}."},
                )

    def clean(self):
        data = super().clean()
        seen: dict[str, str] = {}
        for name in self.fields:
            column = data.get(name)
            if not column:
                continue
            if column in seen:
                self.add_error(
                    name, f"Column '{column}' is already mapped to {seen[column]}; pick one column per field."
                )
            seen.setdefault(column, name)
        return data

    def mapping(self) -> dict[str, str]:
        return {name: column for name, column in self.cleaned_data.items() if column}


class ColumnChoicesForm(forms.Form):
    """Instruction tuning: what each column that judges its rows means (parsing.MEANING_COLUMNS)."""

    CHOICES = [("desirable", "Train on the rows it marks desirable only"), ("ignore", "Ignore it: train on every row")]

    def __init__(self, *args, dataset: Dataset, **kwargs):
        super().__init__(*args, **kwargs)
        for column in dataset.meaning_columns:
            self.fields[column] = forms.ChoiceField(
                label=f"Column '{column}'", choices=self.CHOICES, widget=forms.RadioSelect,
                initial=dataset.column_choices.get(column),
                error_messages={"required": f"Choose what column '{column}' means."},
            )

