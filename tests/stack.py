"""The real stack for end-to-end tests: a fresh database, the ASGI server (uvicorn) and a
Celery worker process, on real Redis. Session-scoped: started once, shared by the tests
that ask for `stack`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "a-long-test-password-42"


@dataclass
class Stack:
    base_url: str
    env: dict[str, str]
    media_root: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: Path | None = None

    def manage(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def create_user(self, username: str, staff: bool = False) -> None:
        code = (
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_user({username!r}, password={PASSWORD!r}, is_staff={staff})"
        )
        self.manage("shell", "-c", code)

    def session(self, username: str) -> requests.Session:
        """A signed-in HTTP client, going through the real login form and CSRF."""
        http = requests.Session()
        page = http.get(f"{self.base_url}/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        reply = http.post(
            f"{self.base_url}/login/", data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token},
            headers={"Referer": f"{self.base_url}/login/"},
        )
        assert reply.url.rstrip("/") == self.base_url, f"login failed: {reply.status_code} {reply.url}"
        return http

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        from webapp.jobs.management.commands.serve import train_worker_command

        self.processes[name] = self._spawn(name, train_worker_command(sys.executable, name))
        return self.processes[name]

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as log:
            return subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self, name: str, lines: int = 60) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text().splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database_url(tmp: Path) -> tuple[str, callable]:
    """A fresh database for this run: PostgreSQL when DATABASE_URL names one, else SQLite."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        return f"sqlite:///{tmp / 'e2e.sqlite3'}", lambda: None
    import psycopg

    name = f"specialist_e2e_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop():
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return re.sub(r"/[^/]*$", f"/{name}", url), drop


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    database_url, drop_database = _database_url(tmp)
    redis_url = "redis://127.0.0.1:6379/14"
    redis.Redis.from_url(redis_url).flushdb()
    port = _free_port()
    env = {
        **os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
        "SPECIALIST_MEDIA_ROOT": str(tmp / "media"), "PYTHONUNBUFFERED": "1",
    }
    stack = Stack(base_url=f"http://127.0.0.1:{port}", env=env, media_root=tmp / "media", logs=tmp)
    stack.manage("migrate", "--noinput")
    stack.processes["web"] = stack._spawn(
        "web", [sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--port", str(port)]
    )
    stack.start_worker()
    _wait_until_up(stack)
    try:
        yield stack
    finally:
        for process in stack.processes.values():
            process.terminate()
        for process in stack.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        drop_database()


def _wait_until_up(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(f"{stack.base_url}/login/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise RuntimeError("the web server did not start:\n" + stack.log_tail("web"))
