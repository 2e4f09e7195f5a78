"""Counting failed sign-ins, so that passwords cannot be guessed at speed."""

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest


def _keys(request: HttpRequest, username: str) -> list[tuple[str, int]]:
    address = request.META.get("REMOTE_ADDR", "?")
    return [
        (f"login-failures:{address}:{username.strip().lower()}", settings.LOGIN_FAILURES_PER_ACCOUNT),
        (f"login-failures:{address}", settings.LOGIN_FAILURES_PER_ADDRESS),
    ]


def is_locked_out(request: HttpRequest, username: str) -> bool:
    return any(cache.get(key, 0) >= limit for key, limit in _keys(request, username))


def record_failure(request: HttpRequest, username: str) -> None:
    for key, _limit in _keys(request, username):
        cache.add(key, 0, timeout=settings.LOGIN_FAILURE_WINDOW_SECONDS)
        cache.incr(key)
