import pytest
from django.core.cache import cache
from django.test import Client

from tests.web_fixtures import PASSWORD

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_counters():
    cache.clear()
    yield
    cache.clear()


def test_a_correct_password_signs_in(owner):
    reply = Client().post("/login/", {"username": "alice", "password": PASSWORD})
    assert reply.status_code == 302 and reply.url == "/"


def test_repeated_failures_lock_the_account_out_even_with_the_right_password(owner, settings):
    client = Client()
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        assert client.post("/login/", {"username": "alice", "password": "wrong"}).status_code == 200
    reply = client.post("/login/", {"username": "alice", "password": PASSWORD})
    assert reply.status_code == 429
    assert "Too many failed sign-in attempts" in reply.content.decode()
    assert "_auth_user_id" not in client.session


def test_other_accounts_are_not_locked_by_someone_elses_failures(owner, other_user, settings):
    client = Client()
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        client.post("/login/", {"username": "alice", "password": "wrong"})
    assert client.post("/login/", {"username": "bob", "password": PASSWORD}).status_code == 302


def test_the_login_form_is_csrf_protected(owner):
    client = Client(enforce_csrf_checks=True)
    assert client.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 403
