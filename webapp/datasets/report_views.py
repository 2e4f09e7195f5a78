"""The dataset page's quality report: a JSON endpoint the page polls until the report is ready."""

from django.http import HttpRequest, JsonResponse
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET

from webapp.datasets import reports
from webapp.datasets.views import _get_dataset_for_user


@require_GET
def dataset_quality(request: HttpRequest, dataset_id: int) -> JsonResponse:
    """?base_model=&max_length= (defaults: the task's suggested ones). Queues the report when it
    is missing; answers {"state": "computing"} until it is done, then the report with its HTML;
    {"state": "waiting", "message": ...} while it cannot be queued (the queue is down, or the
    user's reports in progress are at the limit): the page shows the message and asks again."""
    dataset = _get_dataset_for_user(request, dataset_id)
    base_model, max_length = reports.defaults(dataset.task)
    base_model = request.GET.get("base_model") or base_model
    try:
        max_length = int(request.GET.get("max_length") or max_length)
    except ValueError:
        return JsonResponse({"state": "invalid", "message": "The max length must be a whole number."}, status=400)
    problem = reports.choice_problem(dataset.task, base_model, max_length)
    if problem:
        return JsonResponse({"state": "invalid", "message": problem}, status=400)
    if dataset.is_busy or not dataset.rows_path.is_file():
        return JsonResponse({"state": "waiting", "message": "The report is computed once the file has been read."})
    report = reports.request_report(dataset, base_model, max_length, request.user.id)
    if report["state"] == "done":
        context = {"report": report, "dataset": dataset}
        report["html"] = render_to_string("datasets/_quality_table.html", context, request)
        if "preflight" in report:
            report["preflight_html"] = render_to_string("datasets/_preflight.html", context, request)
    return JsonResponse(report)
