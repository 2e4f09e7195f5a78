"""`python manage.py serve`: the whole app in one foreground command (what `make run` runs).

Makes sure Redis answers (starting a private redis-server if none listens and the binary
exists), then runs the ASGI web server, a training worker, a CPU worker that also runs the
scheduler (the reaper of jobs whose worker died) and the inference server side by side.
Ctrl-C (or SIGTERM) stops all of them. A worker or the inference server that dies (killed, out of memory, a Redis
outage that crashes Celery) is started again, with a growing pause if it keeps dying; its job is
resumed from its checkpoint by the reaper. If the web server or our redis-server dies, everything
stops: without them nothing works.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Serve the web app with a Celery worker attached; Ctrl-C stops everything."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--no-worker", action="store_true", help="Serve the web app only.")
        parser.add_argument("--no-inference", action="store_true", help="Do not start the inference server.")
        parser.add_argument("--inference-port", type=int,
                            default=int(os.environ.get("SPECIALIST_INFERENCE_PORT", 8001)))

    def handle(self, *args, host, port, no_worker, no_inference, inference_port, **options):
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        if not no_inference:
            # The web app and the inference server share a token: nothing else on the machine
            # can call the inference server directly, past the web app's checks.
            os.environ.setdefault("SPECIALIST_INFERENCE_TOKEN", uuid.uuid4().hex)
        children: list[Child] = []
        redis_server = ensure_redis(settings.REDIS_URL, self.stdout)
        if redis_server is not None:
            children.append(Child("redis", redis_server.args, process=redis_server))
        python = sys.executable
        children.append(Child("web", web_command(python, host, port)))
        if not no_worker:
            children.append(Child("train worker", train_worker_command(python), env=train_worker_env(), restart=True))
            children.append(Child("cpu worker", cpu_worker_command(python, settings.VAR_DIR), restart=True))
        if not no_inference:
            children.append(Child("inference server", inference_command(python, inference_port),
                                  env=inference_env(), restart=True))
        self.stdout.write(self.style.SUCCESS(f"Specialist is at http://{host}:{port}/  (Ctrl-C stops it)"))
        supervise(children, self.stderr)


def web_command(python: str, host: str, port: int) -> list[str]:
    """The ASGI server. It ignores X-Forwarded-For: uvicorn would otherwise take the client's
    address from it for any client on this machine, so a local client could pick the address the
    sign-in limit counts. Behind a proxy, SPECIALIST_CLIENT_IP_HEADER says which header to trust."""
    return [python, "-m", "uvicorn", "webapp.asgi:application", "--host", host, "--port", str(port),
            "--no-proxy-headers"]


def train_worker_command(python: str, name: str = "train") -> list[str]:
    """One training job at a time; the solo pool keeps imported libraries warm between jobs.

    worker.announce publishes what the worker can run (CUDA, QLoRA, ...) for the new-job form,
    and imports torch and the recipes when the worker starts rather than when its first job does.
    """
    return [python, "-m", "celery", "-A", "webapp", "worker", "-Q", "train", "--pool", "solo", "--concurrency", "1",
            "-n", f"{name}@%h", "-I", "worker.announce", "--loglevel", "INFO", "--without-gossip",
            "--without-mingle"]


TRAIN_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""torch's OpenMP threads sleep while they wait instead of spinning. On a machine shared with
other processes (the web server, a dataset upload, other services), spinning threads wait for
descheduled ones, and a loaded machine's steps take several times as long (docs/performance.md,
"Levers the app uses"). Set before torch is imported, so it goes in the environment."""


def train_worker_env() -> dict[str, str]:
    """The training worker's environment: TRAIN_WORKER_ENV unless the environment says otherwise."""
    return TRAIN_WORKER_ENV | dict(os.environ)


def inference_command(python: str, port: int) -> list[str]:
    """The inference server (worker/inference/server.py) on an internal address; it registers
    itself in Redis, where the web app finds it."""
    return [python, "-m", "worker.inference.server", "--host", "127.0.0.1", "--port", str(port)]


def inference_env() -> dict[str, str]:
    """Like a training worker, its OpenMP threads sleep while they wait (TRAIN_WORKER_ENV): on a
    machine shared with the web server and a training job, spinning threads slow batched decoding
    several times over (docs/performance.md)."""
    return train_worker_env()


def cpu_worker_command(python: str, var_dir: Path) -> list[str]:
    """Dataset work and the periodic reaper (-B runs the scheduler inside this worker)."""
    schedule = var_dir / "celerybeat-schedule"
    return [python, "-m", "celery", "-A", "webapp", "worker", "-Q", "cpu", "--pool", "threads", "--concurrency", "2",
            "-n", "cpu@%h", "-B", "-s", str(schedule), "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


def ensure_redis(url: str, out) -> subprocess.Popen | None:
    """Return a private redis-server we started, or None when one already answers."""
    if _redis_answers(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise CommandError(f"Redis does not answer at {url}. Start it, or point REDIS_URL at a running one.")
    binary = shutil.which("redis-server")
    if binary is None:
        raise CommandError(
            f"Nothing answers at {url} and redis-server is not installed. Install it "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set REDIS_URL."
        )
    out.write(f"Starting a private redis-server on port {parsed.port or 6379}")
    process = subprocess.Popen(
        [binary, "--port", str(parsed.port or 6379), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tempfile.gettempdir()],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(50):
        if _redis_answers(url):
            return process
        time.sleep(0.1)
    process.terminate()
    raise CommandError(f"Started redis-server, but it does not answer at {url}.")


def _redis_answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return False


class Child:
    """One process `serve` runs; a restartable one comes back, after a pause, when it dies."""

    FIRST_PAUSE, LONGEST_PAUSE, STEADY_SECONDS = 1.0, 30.0, 60.0

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None, restart: bool = False,
                 process: subprocess.Popen | None = None):
        self.name, self.command, self.env, self.restart = name, command, env, restart
        self.pause, self.restart_at = self.FIRST_PAUSE, 0.0
        self.started_at = time.monotonic()
        self.process: subprocess.Popen | None = process or subprocess.Popen(command, env=env)

    def check(self, out) -> bool:
        """False when this child is gone for good; a restartable one is started again."""
        now = time.monotonic()
        if self.process is None:
            if now >= self.restart_at:
                self.started_at, self.process = now, subprocess.Popen(self.command, env=self.env)
            return True
        code = self.process.poll()
        if code is None:
            return True
        if not self.restart:
            out.write(f"The {self.name} stopped (exit code {code}); stopping everything.")
            return False
        if now - self.started_at > self.STEADY_SECONDS:
            self.pause = self.FIRST_PAUSE  # it had been running fine: a one-off crash
        out.write(f"The {self.name} stopped (exit code {code}); starting it again in {self.pause:.0f} s.")
        self.process, self.restart_at = None, now + self.pause
        self.pause = min(self.pause * 2, self.LONGEST_PAUSE)
        return True


def supervise(children: list[Child], out) -> None:
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.check(out) for child in children):
        time.sleep(0.2)
    processes = [child.process for child in reversed(children) if child.process is not None]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


# Running the stack once, on a scratch database (the service bench and the tests' stack) --------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_database(tmp: Path, label: str) -> Iterator[str]:
    """The URL of a database for one run of the stack, gone afterwards: a new PostgreSQL database
    when DATABASE_URL names a server, else a SQLite file in `tmp`."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        yield f"sqlite:///{tmp / f'{label}.sqlite3'}"
        return
    import psycopg

    name = f"specialist_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield re.sub(r"/[^/]*$", f"/{name}", url)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
