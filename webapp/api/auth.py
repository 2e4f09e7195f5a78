"""The API's sign-in (a personal key as a bearer token) and its errors, both in OpenAI's shapes,
so the official client raises the exception it would raise against OpenAI."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from webapp.accounts.models import ApiKey


def error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JsonResponse:
    """`{"error": {"message", "type", "param", "code"}}` with `status` (the client maps 400, 401,
    404, 429 and 503 to its exceptions)."""
    return JsonResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status=status)


def api_key_required(view: Callable) -> Callable:
    """The request's user is the owner of the live key in `Authorization: Bearer <key>`; else 401.

    No session and no CSRF: a key in a header is not sent by a browser on its own, so a page on
    another site cannot make these requests in the user's name."""

    @login_not_required
    @csrf_exempt
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs):
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return error(401, "Send your API key as 'Authorization: Bearer <key>' (make one on the account page).",
                         code="missing_api_key")
        key = ApiKey.authenticate(secret.strip())
        if key is None:
            return error(401, "This API key is not valid: it is unknown or was revoked.", code="invalid_api_key")
        request.user, request.api_key = key.owner, key
        return view(request, *args, **kwargs)

    return wrapped
