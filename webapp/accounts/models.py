"""Personal API keys: how scripts and the OpenAI client sign in.

A key is shown once, when it is made; the server keeps only its SHA-256 digest (a key is 256
random bits, so a fast hash is enough: nothing can be guessed from the digest) and its first
characters, so the account page can tell keys apart. A revoked key never works again.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

KEY_PREFIX = "sk-spec-"
SHOWN_CHARS = 12
"""How much of a key the account page shows ("sk-spec-AbCd…")."""
LAST_USE_PRECISION = timedelta(minutes=1)
"""A key's last use is written at most this often: a busy script does not write on every call."""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKey(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=SHOWN_CHARS)
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    @classmethod
    def issue(cls, owner, name: str) -> tuple[ApiKey, str]:
        """A new key for `owner`: the stored record, and the key itself (shown once, never stored)."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        name = name.strip()[: cls._meta.get_field("name").max_length] or "key"
        key = cls.objects.create(owner=owner, name=name, prefix=secret[:SHOWN_CHARS], digest=digest(secret))
        return key, secret

    @classmethod
    def authenticate(cls, secret: str) -> ApiKey | None:
        """The live key `secret` is, with its owner; None for an unknown, revoked or disabled one."""
        if not secret.startswith(KEY_PREFIX):
            return None
        key = cls.objects.select_related("owner").filter(
            digest=digest(secret), revoked_at__isnull=True, owner__is_active=True
        ).first()
        if key is not None:
            key.record_use()
        return key

    def record_use(self) -> None:
        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= LAST_USE_PRECISION:
            ApiKey.objects.filter(id=self.id).update(last_used_at=now)
            self.last_used_at = now

    def revoke(self) -> bool:
        """Stop the key working; True if this call revoked it."""
        return ApiKey.objects.filter(id=self.id, revoked_at__isnull=True).update(revoked_at=timezone.now()) == 1

    @property
    def is_live(self) -> bool:
        return self.revoked_at is None
