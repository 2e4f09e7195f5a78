"""The OpenAI-compatible API under /v1/, signed in with a personal key (webapp.api.auth), and the
job page's playground, which goes through the same checks with the browser's session.

Each model call is checked here (the body is JSON, the model is the caller's and has succeeded,
it is the right kind for the endpoint), then forwarded to an inference server, which checks the
parameters and runs it (webapp/api/forward.py)."""

import json

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from webapp.api import models_api, targets
from webapp.api.auth import api_key_required, api_view, error
from webapp.api.forward import forward
from webapp.jobs.models import Job


@require_GET
@api_key_required
def list_models(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"object": "list", "data": models_api.models_of(request.user)})


@require_GET
@api_key_required
def retrieve_model(request: HttpRequest, model: str) -> JsonResponse:
    found = models_api.find(request.user, model)
    if found is None:
        return error(404, f"The model '{model}' does not exist or you do not have access to it.", param="model",
                     code="model_not_found")
    return JsonResponse(found)


def _json_body(request: HttpRequest) -> dict:
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise targets.Refusal(400, f"The request body is not valid JSON: {exc}.", param=None,
                              code="invalid_json") from exc
    if not isinstance(body, dict):
        raise targets.Refusal(400, "The request body must be a JSON object.", param=None)
    return body


def _model_call(kind: str):
    """The view of one public endpoint serving models of `kind`."""

    @require_POST
    @api_view
    async def view(request: HttpRequest) -> HttpResponse:
        try:
            body = _json_body(request)
            target = await sync_to_async(targets.for_model)(request.user, body.get("model"), kind)
        except targets.Refusal as refusal:
            return error(refusal.status, refusal.message, param=refusal.param, code=refusal.code)
        return await forward(targets.ENDPOINT_OF_KIND[kind], body, target)

    view.__name__ = f"{kind}_endpoint"
    return view


chat_completions = _model_call("chat")
embeddings = _model_call("embed")
rerank = _model_call("rerank")
classify = _model_call("classify")


@require_POST
@api_view(sign_in_page=True)
async def try_job(request: HttpRequest, job_id: int, which: str) -> HttpResponse:
    """The playground: the same call on a job's fine-tune ("tuned") or its base ("base")."""

    def find_target() -> dict:
        job = Job.objects.filter(id=job_id, owner=request.user).select_related("owner").first()
        if job is None:
            raise targets.Refusal(404, "No such job.", param=None)
        return targets.of_job(job, which)

    try:
        target = await sync_to_async(find_target)()  # another user's job is a 404 whatever the body
        body = _json_body(request)
    except targets.Refusal as refusal:
        return error(refusal.status, refusal.message, param=refusal.param, code=refusal.code)
    return await forward(targets.ENDPOINT_OF_KIND[target["kind"]], body, target)
