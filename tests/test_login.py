import threading

import pytest
import redis
from django.db import connection
from django.test import Client

from tests.support.web_fixtures import PASSWORD
from webapp.accounts import ratelimit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_counters(settings):
    def forget():
        client = redis.Redis.from_url(settings.REDIS_URL)
        for key in client.scan_iter("specialist:login:*"):
            client.delete(key)
        ratelimit._LOCAL.counts.clear()

    forget()
    yield
    forget()


@pytest.fixture
def quick_owner(owner, settings):
    """alice, with a password that is quick to check: these tests fail dozens of times."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    owner.set_password(PASSWORD)
    owner.save()
    return owner


def sign_in(username, password, **headers):
    return Client(**headers).post("/login/", {"username": username, "password": password})


def test_a_correct_password_signs_in(owner):
    reply = sign_in("alice", PASSWORD)
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


@pytest.mark.django_db(transaction=True)  # the threads' own database connections see the user
def test_simultaneous_wrong_passwords_get_at_most_the_limit_of_checks(owner, settings):
    barrier = threading.Barrier(20)
    replies = []

    def guess(n):
        client = Client()
        barrier.wait()
        try:
            replies.append(client.post("/login/", {"username": "alice", "password": f"guess-{n}"}).status_code)
        finally:
            connection.close()  # back to the pool (on PostgreSQL), for the tests after this one

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(replies)) == [200, 429]
    assert replies.count(200) <= settings.LOGIN_FAILURES_PER_ACCOUNT  # a 200 is a password checked


def test_failures_on_many_names_do_not_lock_out_a_right_password_from_the_same_address(quick_owner, settings):
    for n in range(settings.LOGIN_FAILURES_PER_ADDRESS + 5):
        assert sign_in(f"nobody-{n}", "wrong").status_code == 200
    assert sign_in("alice", PASSWORD).status_code == 302


def test_a_busy_address_gets_one_guess_per_name(quick_owner, settings):
    for n in range(settings.LOGIN_FAILURES_PER_ADDRESS):
        sign_in(f"nobody-{n}", "wrong")
    assert sign_in("alice", "guess-1").status_code == 200
    assert sign_in("alice", "guess-2").status_code == 429
    assert sign_in("alice", PASSWORD).status_code == 429
    assert sign_in("alice", PASSWORD, REMOTE_ADDR="10.0.0.9").status_code == 302  # elsewhere: untouched


def test_a_forwarded_header_is_ignored_unless_configured(owner, settings):
    for n in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        sign_in("alice", "wrong", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}")
    assert sign_in("alice", PASSWORD, HTTP_X_FORWARDED_FOR="10.0.0.99").status_code == 429


def test_a_configured_forwarded_header_names_the_client_the_proxy_saw(owner, settings):
    settings.CLIENT_IP_HEADER = "X-Forwarded-For"
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        sign_in("alice", "wrong", HTTP_X_FORWARDED_FOR="1.2.3.4, 10.0.0.1")
    # The left entry is the client's own writing: it cannot dodge the limit...
    assert sign_in("alice", PASSWORD, HTTP_X_FORWARDED_FOR="5.6.7.8, 10.0.0.1").status_code == 429
    # ...and the proxy's neighbours, sharing its REMOTE_ADDR, are not locked out with it.
    assert sign_in("alice", PASSWORD, HTTP_X_FORWARDED_FOR="10.0.0.2").status_code == 302


def test_behind_two_proxies_the_client_is_the_second_entry_from_the_right(rf, settings):
    settings.CLIENT_IP_HEADER = "X-Forwarded-For"
    settings.TRUSTED_PROXIES = 2
    request = rf.post("/login/", HTTP_X_FORWARDED_FOR="6.6.6.6, 10.0.0.1, 172.16.0.2", REMOTE_ADDR="172.16.0.3")
    assert ratelimit.client_address(request) == "10.0.0.1"
    request = rf.post("/login/", HTTP_X_FORWARDED_FOR="10.0.0.1", REMOTE_ADDR="172.16.0.3")
    assert ratelimit.client_address(request) == "172.16.0.3"  # it did not pass both proxies


def test_the_login_form_is_csrf_protected(owner):
    client = Client(enforce_csrf_checks=True)
    assert client.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 403
