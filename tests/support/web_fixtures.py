"""Fixtures for view tests: an owner, another user and an anonymous client."""

import json

import pytest
import redis
from django.test import Client

PASSWORD = "a-long-test-password-42"


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", PASSWORD)


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", PASSWORD)


@pytest.fixture
def owner_client(owner):
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def other_client(other_user):
    client = Client()
    client.force_login(other_user)
    return client


@pytest.fixture
def anon_client(owner):
    # The owner exists, so the first-run page is out of the way.
    return Client()


@pytest.fixture
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.JOBS_ROOT = settings.MEDIA_ROOT / "jobs"
    return settings.MEDIA_ROOT


def queue_headers(settings, name: str):
    """The real broker's queue `name` (tests use their own Redis database): its messages' headers."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(name)
    yield lambda: [json.loads(m)["headers"] for m in broker.lrange(name, 0, -1)]
    broker.delete(name)


@pytest.fixture
def train_queue(settings):
    yield from queue_headers(settings, "train")


@pytest.fixture
def cpu_queue(settings):
    yield from queue_headers(settings, "cpu")
