"""Production settings: `check --deploy` is clean, a default, placeholder or weak secret refuses to
start, and docker-compose.yml runs production settings with a secret the operator must set."""

import os
import re
import secrets
import subprocess
import sys

import pytest
import yaml

from tests.support.stack import REPO


def manage(*args, **env):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True)


def test_check_deploy_is_clean_under_production_settings():
    reply = manage("check", "--deploy", "--fail-level", "WARNING", SPECIALIST_PRODUCTION="1",
                   SECRET_KEY=secrets.token_urlsafe(50), ALLOWED_HOSTS="specialist.example.com")
    assert reply.returncode == 0, reply.stdout + reply.stderr


def test_production_refuses_to_start_with_the_default_secret():
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    reply = subprocess.run([sys.executable, "manage.py", "check"], cwd=REPO, env={**env, "SPECIALIST_PRODUCTION": "1"},
                           capture_output=True, text=True)
    assert reply.returncode != 0 and "set SECRET_KEY" in reply.stderr


def production_check(secret_key: str):
    return manage("check", SPECIALIST_PRODUCTION="1", SECRET_KEY=secret_key, ALLOWED_HOSTS="specialist.example.com")


@pytest.mark.parametrize("secret_key", [
    "change-me-to-a-long-random-value",  # the placeholder docker-compose.yml used to default to
    "CHANGEME", "secret", "dev-only-insecure-key-set-SECRET_KEY-in-production",
    "django-insecure-" + secrets.token_urlsafe(50),  # what startproject writes, long as it is
    secrets.token_urlsafe(50)[:49],  # long enough to look random, shorter than Django's 50
    "ab" * 40,  # long, but two characters
])
def test_production_refuses_a_placeholder_short_or_plain_secret(secret_key):
    reply = production_check(secret_key)
    assert reply.returncode != 0 and "ImproperlyConfigured" in reply.stderr
    assert "set SECRET_KEY" in reply.stderr and "secrets.token_urlsafe(50)" in reply.stderr


def test_a_refused_secret_is_not_written_to_the_log():
    secret_key = secrets.token_urlsafe(30)
    reply = production_check(secret_key)
    assert reply.returncode != 0 and secret_key not in reply.stdout + reply.stderr


def test_production_accepts_a_generated_secret():
    reply = production_check(secrets.token_urlsafe(50))
    assert reply.returncode == 0, reply.stderr


def compose_services() -> dict:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return {name: service for name, service in compose["services"].items() if "SECRET_KEY" in service.get("environment", {})}


def test_docker_compose_requires_a_secret_key_and_defaults_to_production():
    services = compose_services()
    assert {"web", "worker", "cpu-worker", "inference"} <= set(services)
    for name, service in services.items():
        environment = service["environment"]
        # ${VAR:?message}: compose stops with the message when the variable is unset or empty.
        assert re.fullmatch(r"\$\{SECRET_KEY:\?[^}]+\}", environment["SECRET_KEY"]), name
        assert environment["SPECIALIST_PRODUCTION"] == "${SPECIALIST_PRODUCTION:-1}", name
    assert "change-me" not in (REPO / "docker-compose.yml").read_text()


def test_the_inference_server_has_its_own_gpu_service_and_the_web_does_not_start_one():
    services = compose_services()
    assert "worker.inference.server" in services["inference"]["command"]
    devices = services["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "--no-inference" in services["web"]["command"] and "ports" not in services["inference"]


def test_a_yes_no_setting_that_is_neither_stops_the_server_with_its_name():
    reply = manage("check", DEBUG="ture")
    assert reply.returncode != 0
    assert "DEBUG='ture'" in reply.stderr and "true" in reply.stderr and "false" in reply.stderr
    assert manage("check", DEBUG="off").returncode == 0
