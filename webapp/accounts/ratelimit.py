"""Counting sign-in attempts, so that passwords cannot be guessed at speed.

Two counters per attempt, both kept for LOGIN_FAILURE_WINDOW_SECONDS from their first attempt:
one for the name typed at this address, one for the address. An attempt first adds itself to
both (one atomic step), then is refused if that put it over a limit, so concurrent attempts
cannot all pass a check made before any of them was counted. An attempt that was refused, or
that signed in, takes itself off again: what stays counted are the failures (and the attempts
still being checked).

The address limit only stops names that have attempts of their own at this address: someone
who fails on many names locks none of the others out, while each name still gets at most one
check from a busy address.

The counters live in Redis (shared by all web processes); when Redis is unreachable they fall
back to this process's memory, which still limits guessing (per process) instead of failing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings
from django.http import HttpRequest

log = logging.getLogger(__name__)

# Adds ARGV[1] to every key, starting the window on a key's first attempt; returns the counts.
# A key that expired meanwhile is not brought back by taking an attempt off (it would never expire).
_ADJUST = """
local counts = {}
for i, key in ipairs(KEYS) do
  if tonumber(ARGV[1]) < 0 and redis.call('EXISTS', key) == 0 then
    counts[i] = 0
  else
    counts[i] = redis.call('INCRBY', key, ARGV[1])
    if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ARGV[2]) end
  end
end
return counts
"""


@dataclass
class Attempt:
    keys: list[str]
    refused: bool

    def finish(self, failed: bool) -> None:
        """A failure stays counted; anything else (signed in, refused unchecked) is taken off."""
        if not failed:
            _adjust(self.keys, -1)


def start_attempt(request: HttpRequest, username: str) -> Attempt:
    """Count this attempt; refused when it is over the name's limit, or over the address's
    limit for a name that already has attempts of its own here."""
    address = client_address(request)
    keys = [f"specialist:login:{address}:{_digest(username.strip().lower())}", f"specialist:login:{address}"]
    for_name, for_address = _adjust(keys, 1)
    over_name = for_name > settings.LOGIN_FAILURES_PER_ACCOUNT
    over_address = for_address > settings.LOGIN_FAILURES_PER_ADDRESS and for_name > 1
    attempt = Attempt(keys, refused=over_name or over_address)
    if attempt.refused:
        attempt.finish(failed=False)
    return attempt


def client_address(request: HttpRequest) -> str:
    """REMOTE_ADDR, or with SPECIALIST_CLIENT_IP_HEADER the entry that the outermost of the
    SPECIALIST_TRUSTED_PROXIES proxies appended (a client can write anything left of it)."""
    remote = request.META.get("REMOTE_ADDR", "?")
    header = settings.CLIENT_IP_HEADER
    if not header:
        return remote
    value = request.META.get("HTTP_" + header.upper().replace("-", "_"), "")
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if len(entries) < settings.TRUSTED_PROXIES:
        return remote  # it did not come through the proxies
    return entries[-settings.TRUSTED_PROXIES]


def _digest(text: str) -> str:
    # Any name a client types becomes a short, safe key.
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _adjust(keys: list[str], delta: int) -> list[int]:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    try:
        return [int(count) for count in _script()(keys=keys, args=[delta, window])]
    except redis.RedisError as exc:
        log.warning("sign-in limits: Redis is unreachable (%s); counting in this process only", exc)
        return _LOCAL.adjust(keys, delta, window)


@cache
def _script():
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    return client.register_script(_ADJUST)


class LocalCounts:
    """The fallback: the same counting, in this process's memory."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)

    def adjust(self, keys: list[str], delta: int, window: int) -> list[int]:
        now = time.monotonic()
        with self.lock:
            self.counts = {key: entry for key, entry in self.counts.items() if entry[1] > now}
            result = []
            for key in keys:
                if delta < 0 and key not in self.counts:
                    result.append(0)
                    continue
                count, expires = self.counts.get(key, (0, now + window))
                self.counts[key] = (count + delta, expires)
                result.append(count + delta)
            return result


_LOCAL = LocalCounts()
