"""A fine-tuning job's exports through the API (Specialist's; OpenAI has none): ask for a merged
model or a GGUF, follow its state, download it. The same Export rows as the job page's section
(webapp/exports): one per job and kind, built once on the cpu worker."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_http_methods

from webapp.api import fine_tuning
from webapp.api.auth import api_key_required, error
from webapp.exports.models import KINDS, Export, ExportRefused
from webapp.jobs.downloads import file_download

EXPORT_PREFIX = "export-"


def export_object(export: Export) -> dict[str, Any]:
    body = export.as_dict()
    body.update(id=f"{EXPORT_PREFIX}{export.id}", object="fine_tuning.job.export",
                fine_tuning_job_id=fine_tuning.api_job_id(export.job),
                download_url=f"/v1/exports/{EXPORT_PREFIX}{export.id}/content" if export.file else None)
    del body["job_id"]
    return body


@require_http_methods(["GET", "POST"])
@api_key_required
def job_exports(request: HttpRequest, fine_tuning_job: str) -> JsonResponse:
    try:
        job = fine_tuning._job_of(request.user, fine_tuning_job)
    except fine_tuning.Invalid as problem:
        return problem.response()
    if request.method == "GET":
        data = [export_object(export) for export in job.exports.all()]
        return JsonResponse({"object": "list", "data": data, "has_more": False})
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return error(400, "The request body is not valid JSON.", param=None)
    kind = body.get("kind") if isinstance(body, dict) else None
    if kind not in KINDS:
        return error(400, f"kind must be one of {', '.join(KINDS)}.", param="kind")
    try:
        export = Export.request(job, kind)
    except ExportRefused as refusal:
        return error(400, str(refusal), param="kind", code="export_refused")
    return JsonResponse(export_object(export))


@require_GET
@api_key_required
def export_content(request: HttpRequest, export: str) -> HttpResponse:
    number = export.removeprefix(EXPORT_PREFIX)
    found = Export.objects.filter(id=int(number), job__owner=request.user).select_related("job").first() \
        if export.startswith(EXPORT_PREFIX) and number.isdigit() else None
    if found is None:
        return error(404, f"No such export: '{export[:80]}'.", param="export_id", code="export_not_found")
    if found.file is None:
        return error(400, f"The export is {found.state}, not ready to download"
                          f"{': ' + found.message if found.message else ''}.", param="export_id", code="not_ready")
    return file_download(request, found.file, filename=found.file.name)
