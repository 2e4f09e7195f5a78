"""The app as a user runs it, for the service bench: `manage.py serve` (uvicorn, a Celery training
worker, a CPU worker with the scheduler) on Redis and a fresh database, and a user's actions over
HTTP. The bench reads the jobs straight from that database through the app's own models."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from webapp.jobs.management.commands.serve import free_port, fresh_database

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "a-long-bench-password-42"
TRAIN_JOB_DONE = re.compile(r"train_job\[[^\]]+\] succeeded in")
"""The Celery log line of a finished training task (the CPU worker's tasks finish too)."""


@dataclass
class ServedApp:
    base_url: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen

    # The processes ------------------------------------------------------------------------
    def web_pid(self) -> int:
        """The uvicorn process `serve` started."""
        for pid in _children(self.process.pid):
            if "uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        raise RuntimeError("serve runs no web server:\n" + self.log_tail())

    def log_tail(self, lines: int = 120) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:]) if self.log.exists() else ""

    def training_jobs_done(self) -> int:
        return len(TRAIN_JOB_DONE.findall(self.log.read_text()))

    # A user's actions, over HTTP ------------------------------------------------------------
    def create_user(self, username: str) -> None:
        from django.contrib.auth import get_user_model

        get_user_model().objects.create_user(username, password=PASSWORD)

    def session(self, username: str) -> requests.Session:
        """A signed-in HTTP client, through the real login form and CSRF."""
        http = requests.Session()
        reply = http.post(
            f"{self.base_url}/login/", headers={"Referer": f"{self.base_url}/login/"},
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": self.csrf(http, "/login/")},
        )  # fmt: skip
        if reply.url.rstrip("/") != self.base_url:
            raise RuntimeError(f"login failed: {reply.status_code} {reply.url}")
        return http

    def csrf(self, http: requests.Session, path: str) -> str:
        page = http.get(f"{self.base_url}{path}").text
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)

    def post(self, http: requests.Session, path: str) -> requests.Response:
        """A button's POST (cancel, ...) from the page the path is under."""
        page = re.sub(r"[^/]+/$", "", path)
        data = {"csrfmiddlewaretoken": self.csrf(http, page)}
        return http.post(f"{self.base_url}{path}", data=data, headers={"Referer": f"{self.base_url}{page}"})

    # Looking inside -----------------------------------------------------------------------
    def job(self, job_id: int) -> dict:
        """The job's state and its event history, from the database."""
        from webapp.jobs.models import Job

        job = Job.objects.get(id=job_id)
        return {"state": job.state, "message": job.message, "events": job.history()}

    def wait_for(self, job_id: int, condition: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if condition(job):
                return job
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} never reached {what}: {job['state']}\n{self.log_tail()}")


@contextlib.contextmanager
def served_app(tmp: Path, redis_url: str, **env_overrides: str) -> Iterator[ServedApp]:
    """`manage.py serve` on a fresh database and a flushed Redis database, until the block ends.

    This process talks to the same database through Django, so it takes the served environment
    before Django starts."""
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    with fresh_database(tmp, "bench") as database_url:
        env = {
            **os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "SPECIALIST_VAR_DIR": str(tmp),
            "SPECIALIST_MEDIA_ROOT": str(tmp / "media"), "PYTHONUNBUFFERED": "1", **env_overrides,
        }  # fmt: skip
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO, env=env, check=True,
                       capture_output=True)  # fmt: skip
        _start_django(env)
        log = tmp / "serve.log"
        with log.open("a") as out:
            command = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        app = ServedApp(base_url=f"http://127.0.0.1:{port}", env=env, log=log, process=process)
        try:
            _wait_until_up(app)
            yield app
        finally:
            stop(process)
            from django.db import connections

            connections.close_all()  # before a PostgreSQL database is dropped


def _start_django(env: dict[str, str]) -> None:
    import django

    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    django.setup()


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()]


def _wait_until_up(app: ServedApp) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and app.process.poll() is None:
        try:
            requests.get(f"{app.base_url}/login/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise RuntimeError("the web server did not start:\n" + app.log_tail())


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, as Ctrl-C (serve stops its web server and workers and waits for them); killed
    after `timeout` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
