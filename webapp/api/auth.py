"""The API's sign-in (a personal key as a bearer token) and its errors, both in OpenAI's shapes,
so the official client raises the exception it would raise against OpenAI."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import wraps

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from webapp.accounts.models import ApiKey

log = logging.getLogger(__name__)


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


def api_view(view: Callable | None = None, *, sign_in_page: bool = False) -> Callable:
    """An async API view for a key (`Authorization: Bearer`) or a signed-in session.

    A session request (the playground, or a script riding on a browser's cookies) must pass
    Django's CSRF check, since a browser sends cookies on its own. Both count against the same
    per-minute limit (429 with Retry-After). With `sign_in_page` (the playground's endpoints),
    a visitor who is not signed in is sent to the sign-in page like on every other page."""
    if view is None:
        return lambda view: api_view(view, sign_in_page=sign_in_page)

    @csrf_exempt
    @wraps(view)
    async def wrapped(request: HttpRequest, *args, **kwargs):
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        if scheme or secret:
            if scheme.lower() != "bearer" or not secret.strip():
                return error(401, "Send your API key as 'Authorization: Bearer <key>'.", code="missing_api_key")
            key = await sync_to_async(ApiKey.authenticate)(secret.strip())
            if key is None:
                return error(401, "This API key is not valid: it is unknown or was revoked.", code="invalid_api_key")
            request.user, request.api_key, who = key.owner, key, f"key:{key.id}"
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return error(401, "Sign in, or send your API key as 'Authorization: Bearer <key>'.",
                             code="missing_api_key")
            refused = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            if refused is not None:
                return error(403, "The CSRF check failed: reload the page and try again.", code="csrf_failed")
            request.user, who = user, f"user:{user.id}"
        wait = await sync_to_async(over_limit)(who)
        if wait:
            response = error(429, f"Too many requests: at most {settings.API_REQUESTS_PER_MINUTE} a minute. "
                                  f"Try again in {wait} s.", type="rate_limit_error", code="rate_limit_exceeded")
            response["Retry-After"] = str(wait)
            return response
        return await view(request, *args, **kwargs)

    return wrapped if sign_in_page else login_not_required(wrapped)


RATE_KEY = "specialist:api-rate:"


def over_limit(who: str) -> int:
    """0 if `who` may make one more request this minute, else the seconds until it may. Counted
    in Redis (one window per minute, shared by every web process); with Redis down, not limited."""
    window = int(time.time() // 60)
    key = f"{RATE_KEY}{who}:{window}"
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        count, _ = client.pipeline().incr(key).expire(key, 120).execute()
    except redis.RedisError:
        log.warning("API rate limit not counted: Redis is unreachable")
        return 0
    if count <= settings.API_REQUESTS_PER_MINUTE:
        return 0
    return max(1, (window + 1) * 60 - int(time.time()))
