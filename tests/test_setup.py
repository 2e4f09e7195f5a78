import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db


def test_the_first_visit_asks_for_the_admin_account():
    reply = Client().get("/")
    assert reply.status_code == 302 and reply.url == "/setup/"


def test_setup_creates_a_signed_in_superuser():
    client = Client()
    reply = client.post("/setup/", {"username": "admin", "email": "", "password1": "a-long-test-password-42",
                                    "password2": "a-long-test-password-42"})
    assert reply.status_code == 302
    admin = get_user_model().objects.get()
    assert admin.is_superuser and admin.is_staff
    assert client.get("/").status_code == 200


def test_setup_refuses_a_weak_password():
    reply = Client().post("/setup/", {"username": "admin", "password1": "123", "password2": "123"})
    assert reply.status_code == 200
    assert not get_user_model().objects.exists()
    assert "too short" in reply.content.decode()


def test_setup_is_gone_once_an_account_exists(owner):
    assert Client().get("/setup/").status_code == 302


def test_pages_require_sign_in(anon_client):
    for url in ("/", "/datasets/", "/datasets/upload/", "/jobs/new/"):
        reply = anon_client.get(url)
        assert reply.status_code == 302 and reply.url.startswith("/login/"), url
