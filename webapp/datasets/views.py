from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.views.decorators.http import require_POST

from webapp.datasets.forms import UploadForm
from webapp.datasets.models import Dataset
from webapp.datasets.parsing import parse_dataset


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
    upload = form.cleaned_data["file"]
    dataset = Dataset(
        owner=request.user, task=form.cleaned_data["task"], original_name=upload.name[:255],
        name=form.cleaned_data["name"] or upload.name[:200], size_bytes=upload.size,
    )
    dataset.original.save(upload.name, upload, save=False)
    dataset.rows_path.parent.mkdir(parents=True, exist_ok=True)
    report = parse_dataset(dataset.original.path, upload.name, task=dataset.task, out_path=dataset.rows_path)
    if not report.usable:
        dataset.delete_files()
        form.add_error("file", report.fatal or _no_usable_rows(report))
        form.report = report
        return None
    dataset.format = report.format
    dataset.chat_format = report.chat_format or ""
    dataset.columns, dataset.mapping = report.columns, report.mapping
    dataset.rows_total, dataset.rows_ok = report.rows_total, report.rows_ok
    dataset.error_counts = report.error_counts
    dataset.errors = [vars(error) for error in report.errors]
    dataset.preview_rows = report.preview
    dataset.save()
    if dataset.rows_rejected:
        messages.warning(request, f"{dataset.rows_rejected} of {dataset.rows_total} rows were rejected; see below.")
    return dataset


def _no_usable_rows(report) -> str:
    first = report.errors[0] if report.errors else None
    where = f" First problem: line {first.line}, {first.column or 'row'}: {first.problem}." if first else ""
    return f"None of the {report.rows_total} rows can be used.{where}"


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
