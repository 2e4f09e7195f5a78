import json

from django.conf import settings
from django.contrib import messages
from django.core.files.base import ContentFile
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp.datasets.forms import UploadForm
from webapp.datasets.models import Dataset, DatasetRejected
from webapp.datasets.tasks import TASKS, sample_rows


def _datasets_for_user(user):
    return Dataset.objects.all() if user.is_staff else Dataset.objects.filter(owner=user)


def _get_dataset_for_user(request: HttpRequest, dataset_id: int) -> Dataset:
    return get_object_or_404(_datasets_for_user(request.user), id=dataset_id)


def dataset_list(request: HttpRequest) -> HttpResponse:
    return render(request, "datasets/list.html", {"datasets": _datasets_for_user(request.user)})


def upload(request: HttpRequest) -> HttpResponse:
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        dataset = _store_and_parse(request, form)
        if dataset is not None:
            return redirect("dataset", dataset.id)
    if getattr(request, "upload_too_large", False):
        limit = filesizeformat(settings.MAX_UPLOAD_BYTES)
        form.errors["file"] = form.error_class([f"The file is larger than the limit of {limit}."])
    return render(request, "datasets/upload.html", {"form": form}, status=400 if form.errors else 200)


def _store_and_parse(request: HttpRequest, form: UploadForm) -> Dataset | None:
    """Keep the upload only if it yields usable rows; otherwise explain why on the form."""
    try:
        dataset = Dataset.from_upload(
            request.user, form.cleaned_data["task"], form.cleaned_data["name"], form.cleaned_data["file"]
        )
    except DatasetRejected as rejected:
        form.add_error("file", str(rejected))
        form.report = rejected.report
        return None
    if dataset.rows_rejected:
        messages.warning(request, f"{dataset.rows_rejected} of {dataset.rows_total} rows were rejected; see below.")
    return dataset


@require_POST
def use_sample(request: HttpRequest, task: str) -> HttpResponse:
    """"Try with sample data": the project's sample dataset for `task`, then the new-job form."""
    if task not in TASKS:
        raise Http404("No such task.")
    content = "".join(json.dumps(row) + "\n" for row in sample_rows(task)).encode()
    upload = ContentFile(content, name=f"sample-{task}.jsonl")
    dataset = Dataset.from_upload(request.user, task, f"Sample: {TASKS[task].name}", upload)
    return redirect(f"{reverse('new_job')}?dataset={dataset.id}")


def dataset_detail(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = _get_dataset_for_user(request, dataset_id)
    return render(request, "datasets/detail.html", {"dataset": dataset, "jobs": dataset.job_set.all()})


@require_POST
def delete(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = _get_dataset_for_user(request, dataset_id)
    if dataset.job_set.exists():
        messages.error(request, "This dataset was used by a job and is kept with it; delete the jobs first.")
        return redirect("dataset", dataset.id)
    dataset.delete_files()
    dataset.delete()
    messages.info(request, f"Deleted {dataset.name}.")
    return redirect("datasets")
