from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from webapp.exports.models import Export, ExportRefused
from webapp.jobs.downloads import file_download
from webapp.jobs.models import Job


def _get_export_for_user(request: HttpRequest, export_id: int) -> Export:
    """The user's own export: another user's (staff included) is a 404, like a missing one."""
    return get_object_or_404(Export.objects.select_related("job"), id=export_id, job__owner=request.user)


@require_POST
def request_export(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    try:
        export = Export.request(job, request.POST.get("kind", ""))
    except ExportRefused as refusal:
        messages.error(request, str(refusal))
    else:
        if export.state == "ready":
            messages.info(request, f"{export.label} is ready to download.")
        else:
            messages.info(request, f"{export.label}: {export.state}. It is built on the server; reload this page to follow it.")
    return redirect(f"{job.get_absolute_url()}#exports")


def download_export(request: HttpRequest, export_id: int) -> HttpResponse:
    export = _get_export_for_user(request, export_id)
    if export.file is None:
        return HttpResponse(f"This export is {export.state}, not ready to download.", status=409, content_type="text/plain")
    return file_download(request, export.file, filename=export.file.name)
