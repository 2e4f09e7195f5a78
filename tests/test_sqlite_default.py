"""Without DATABASE_URL, a fresh checkout migrates and serves on its SQLite default."""

import os
import subprocess
import sys
import time

import pytest
import requests

from tests.support.stack import REPO
from webapp.jobs.management.commands.serve import free_port, web_command

pytestmark = pytest.mark.slow


def test_the_sqlite_default_migrates_and_serves(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["SPECIALIST_VAR_DIR"] = str(tmp_path)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True)
    assert (tmp_path / "specialist.sqlite3").is_file()
    port = free_port()
    server = subprocess.Popen(web_command(sys.executable, "127.0.0.1", port),
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert reply.url.endswith("/setup/") and reply.status_code == 200
        assert "Create the administrator account" in reply.text or "administrator" in reply.text
        assert requests.get(f"http://127.0.0.1:{port}/static/vendor/plotly.min.js", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=10)
