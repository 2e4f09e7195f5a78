import functools
import json

from django.conf import settings
from django.contrib import messages
from django.core.files.base import ContentFile
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from webapp.datasets.forms import ColumnChoicesForm, FileForm, MappingForm, UploadForm
from webapp.datasets.models import REJECTED, REVIEW, Dataset, DatasetLocked, DatasetRejected
from webapp.datasets.samples import sample_name, sample_rows, sample_task
from webapp.jobs import evaluations
from worker.spec import TrainChoices

DEFAULT_VALIDATION_FRACTION = TrainChoices.defaults()["validation_fraction"]


def _datasets_for_user(user):
    return Dataset.objects.all() if user.is_staff else Dataset.objects.filter(owner=user)


def _get_dataset_for_user(request: HttpRequest, dataset_id: int) -> Dataset:
    return get_object_or_404(_datasets_for_user(request.user), id=dataset_id)


def dataset_list(request: HttpRequest) -> HttpResponse:
    return render(request, "datasets/list.html", {"datasets": _datasets_for_user(request.user)})


def upload(request: HttpRequest) -> HttpResponse:
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and not _too_large(request, form) and form.is_valid():
        dataset = _store_and_parse(request, form)
        if dataset is not None:
            return redirect("dataset", dataset.id)
    return render(request, "datasets/upload.html", {"form": form}, status=400 if form.errors else 200)


def _too_large(request: HttpRequest, form) -> bool:
    """Whether the request's files together passed the upload limit (SizeLimitHandler stopped
    reading them); then the form says so, and none of its files is kept, not even those that
    arrived whole before the limit: a training file without its validation file is not what
    the user sent."""
    if not getattr(request, "upload_too_large", False):
        return False
    limit = filesizeformat(settings.MAX_UPLOAD_BYTES)
    form.errors["file"] = form.error_class(
        [f"The upload is larger than the limit of {limit} (all its files together)."]
    )
    return True


def _store_and_parse(request: HttpRequest, form: UploadForm) -> Dataset | None:
    """Keep the upload unless it cannot be read as a dataset at all; then explain why on the form."""
    data = form.cleaned_data
    try:
        dataset = Dataset.from_upload(request.user, data["task"], data["name"], data["file"], data["validation_file"])
    except DatasetRejected as rejected:
        form.add_error(rejected.field, str(rejected))
        form.rejected_rows = rejected.errors
        return None
    _say_status(request, dataset)
    return dataset


def _say_status(request: HttpRequest, dataset: Dataset) -> None:
    if dataset.status == REVIEW:
        messages.warning(request, "Some rows were rejected; choose below whether to train on the rest.")
    elif dataset.status == REJECTED:
        messages.error(request, "This file cannot be trained on as it is; see below what to change.")


@require_POST
def use_sample(request: HttpRequest, task: str) -> HttpResponse:
    """ "Try with sample data": the project's sample dataset `task` (a family, or one of the extra
    sample sets such as tool selection), then the new-job form."""
    family = sample_task(task)
    if family is None:
        raise Http404("No such task.")
    content = "".join(json.dumps(row) + "\n" for row in sample_rows(task)).encode()
    upload = ContentFile(content, name=f"sample-{task}.jsonl")
    # Read now whatever the inline limit: the new-job form offers only ready datasets.
    dataset = Dataset.from_upload(request.user, family, f"Sample: {sample_name(task)}", upload, read_now=True)
    return redirect(f"{reverse('new_job')}?dataset={dataset.id}")


def dataset_detail(request: HttpRequest, dataset_id: int) -> HttpResponse:
    return _detail_page(request, _get_dataset_for_user(request, dataset_id))


def _evaluate_form(request: HttpRequest, dataset: Dataset) -> evaluations.EvaluateForm:
    """The Evaluate form, with the job a job page's "Evaluate on a test set" names (?evaluate=<id>)
    ticked when it is one of the choices."""
    form = evaluations.EvaluateForm(dataset=dataset)
    chosen = request.GET.get("evaluate", "")
    if chosen.isdigit() and form.fields["jobs"].queryset.filter(id=int(chosen)).exists():
        form.initial["jobs"] = [int(chosen)]
    return form


def _detail_page(request: HttpRequest, dataset: Dataset, status: int = 200, **forms) -> HttpResponse:
    context = {
        "dataset": dataset,
        "jobs": dataset.job_set.all(),
        "mapping_form": forms.get("mapping_form") or MappingForm(dataset=dataset),
        "columns_form": forms.get("columns_form") or ColumnChoicesForm(dataset=dataset),
        "replace_form": forms.get("replace_form") or FileForm(auto_id="id_replace_%s"),
        "validation_form": forms.get("validation_form") or FileForm(auto_id="id_validation_%s"),
        "validation_fraction": DEFAULT_VALIDATION_FRACTION,
        "held_out_rows": dataset.held_out_rows(DEFAULT_VALIDATION_FRACTION),
        "leaderboard": evaluations.leaderboard(dataset),
        "evaluate_form": _evaluate_form(request, dataset) if evaluations.can_evaluate(dataset) else None,
    }
    return render(request, "datasets/detail.html", context, status=status)


@require_GET
def dataset_status(request: HttpRequest, dataset_id: int) -> JsonResponse:
    """What the dataset page polls while the file is being read."""
    dataset = _get_dataset_for_user(request, dataset_id)
    return JsonResponse({"status": dataset.status, "label": dataset.get_status_display(), "busy": dataset.is_busy})


def _changing_dataset(view):
    """For views that change a dataset: the user's dataset, unless a job or a running read locks it."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, dataset_id: int) -> HttpResponse:
        dataset = _get_dataset_for_user(request, dataset_id)
        try:
            dataset.check_can_change()
            return view(request, dataset)
        except DatasetLocked as locked:
            messages.error(request, str(locked))
            return redirect("dataset", dataset.id)

    return wrapper


@require_POST
@_changing_dataset
def change_mapping(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    if "detect" in request.POST:
        dataset.set_mapping(None)
        return _read_again(request, dataset)
    form = MappingForm(request.POST, dataset=dataset)
    if not form.is_valid():
        return _detail_page(request, dataset, status=400, mapping_form=form)
    dataset.set_mapping(form.mapping())
    return _read_again(request, dataset)


@require_POST
@_changing_dataset
def choose_columns(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    form = ColumnChoicesForm(request.POST, dataset=dataset)
    if not form.is_valid():
        return _detail_page(request, dataset, status=400, columns_form=form)
    dataset.set_column_choices(form.cleaned_data)
    return _read_again(request, dataset)


@require_POST
@_changing_dataset
def choose_media(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    """Read the file again with its images, audio and video dropped ("drop"), or refused again."""
    dataset.set_drop_media(request.POST.get("media") == "drop")
    return _read_again(request, dataset)


@require_POST
@_changing_dataset
def replace_file(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    form = FileForm(request.POST, request.FILES, auto_id="id_replace_%s")
    if _too_large(request, form) or not form.is_valid():
        return _detail_page(request, dataset, status=400, replace_form=form)
    dataset.replace_file(form.cleaned_data["file"])
    return _read_again(request, dataset)


@require_POST
@_changing_dataset
def add_validation(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    form = FileForm(request.POST, request.FILES, auto_id="id_validation_%s")
    if _too_large(request, form) or not form.is_valid():
        return _detail_page(request, dataset, status=400, validation_form=form)
    dataset.set_validation_file(form.cleaned_data["file"])
    return _read_again(request, dataset)


@require_POST
@_changing_dataset
def remove_validation(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    dataset.remove_validation_file()
    return _read_again(request, dataset)


def _read_again(request: HttpRequest, dataset: Dataset) -> HttpResponse:
    _say_status(request, dataset)
    return redirect("dataset", dataset.id)


@require_POST
def accept_rows(request: HttpRequest, dataset_id: int) -> HttpResponse:
    """The user trains on the usable rows: the rejected ones are dropped and the dataset is ready."""
    dataset = _get_dataset_for_user(request, dataset_id)
    if dataset.accept_dropped_rows():
        messages.info(request, f"Ready: jobs train on the {dataset.rows_ok} usable rows.")
    return redirect("dataset", dataset.id)


@require_POST
def delete(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = _get_dataset_for_user(request, dataset_id)
    if dataset.in_use:
        messages.error(request, "This dataset was used by a job and is kept with it; delete the jobs first.")
        return redirect("dataset", dataset.id)
    dataset.delete_files()
    dataset.delete()
    messages.info(request, f"Deleted {dataset.name}.")
    return redirect("datasets")
