"""The OpenAI-compatible API under /v1/, signed in with a personal key (webapp.api.auth)."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from webapp.api import models_api
from webapp.api.auth import api_key_required, error


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
