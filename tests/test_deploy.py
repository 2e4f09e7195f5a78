"""Production settings: `check --deploy` is clean, and a default secret refuses to start."""

import os
import secrets
import subprocess
import sys

from tests.stack import REPO


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
