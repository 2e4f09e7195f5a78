"""The real stack for end-to-end tests: a fresh database, the ASGI server (uvicorn) and Celery
worker processes, on real Redis. `stack` is session-scoped and shared; fault-injection tests
start their own with `running_stack` (their own Redis database, or a private redis-server)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from webapp.jobs.management.commands.serve import free_port, fresh_database

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "a-long-test-password-42"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Stack:
    base_url: str
    env: dict[str, str]
    media_root: Path
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    inference_url: str = ""

    # Processes ----------------------------------------------------------------------------
    def manage(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def start_worker(self, name: str = "worker", command: list[str] | None = None) -> subprocess.Popen:
        from webapp.jobs.management.commands.serve import train_worker_command

        self.processes[name] = self._spawn(name, command or train_worker_command(sys.executable, name))
        return self.processes[name]

    def start_cpu_worker(self) -> subprocess.Popen:
        """The CPU worker with the scheduler inside: it runs the reaper (one per stack: tests that
        share a stack share it)."""
        from webapp.jobs.management.commands.serve import cpu_worker_command

        running = self.processes.get("cpu")
        if running is None or running.poll() is not None:
            self.processes["cpu"] = self._spawn("cpu", cpu_worker_command(sys.executable, self.logs))
        return self.processes["cpu"]

    def start_inference(self) -> str:
        """The inference server (once per stack); returns its URL when it has registered in Redis."""
        from webapp.jobs.management.commands.serve import TRAIN_WORKER_ENV, inference_command

        running = self.processes.get("inference")
        if running is None or running.poll() is not None:
            port = free_port()
            command = inference_command(sys.executable, port)
            with open(self.logs / "inference.log", "a") as log:
                self.processes["inference"] = subprocess.Popen(
                    command, cwd=REPO, env={**TRAIN_WORKER_ENV, **self.env}, stdout=log, stderr=subprocess.STDOUT)
            self.inference_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        client = redis.Redis.from_url(self.env["REDIS_URL"])
        while time.monotonic() < deadline:
            if any(key for key in client.scan_iter(match="specialist:inference:*")):
                return self.inference_url
            if self.processes["inference"].poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError("the inference server did not start:\n" + self.log_tail("inference"))

    def inference_health(self) -> dict:
        return requests.get(f"{self.inference_url}/health", timeout=10).json()

    def stop(self, name: str, kill: bool = False) -> None:
        process = self.processes.pop(name)
        process.kill() if kill else process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as log:
            return subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    # A user's actions, over HTTP -------------------------------------------------------------
    def create_user(self, username: str, staff: bool = False) -> None:
        code = (
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_user({username!r}, password={PASSWORD!r}, is_staff={staff})"
        )
        self.manage("shell", "-c", code)

    def session(self, username: str) -> requests.Session:
        """A signed-in HTTP client, going through the real login form and CSRF."""
        http = requests.Session()
        reply = http.post(
            f"{self.base_url}/login/", headers={"Referer": f"{self.base_url}/login/"},
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": self.csrf(http, "/login/")},
        )
        assert reply.url.rstrip("/") == self.base_url, f"login failed: {reply.status_code} {reply.url}"
        return http

    def csrf(self, http: requests.Session, path: str) -> str:
        page = http.get(f"{self.base_url}{path}").text
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)

    def upload_dataset(self, http: requests.Session, path: Path, task: str = "sft") -> int:
        url = f"{self.base_url}/datasets/upload/"
        with path.open("rb") as f:
            reply = http.post(
                url, data={"csrfmiddlewaretoken": self.csrf(http, "/datasets/upload/"), "task": task, "name": path.stem},
                files={"file": (path.name, f)}, headers={"Referer": url},
            )
        match = re.search(r"/datasets/(\d+)/$", reply.url)
        assert match, f"upload was not accepted ({reply.status_code}): {reply.text[:2000]}"
        return int(match.group(1))

    def submit_job(self, http: requests.Session, dataset_id: int, base_dir: Path, **overrides) -> int:
        """Create an SFT LoRA job through the new-job form; returns its id."""
        url = f"{self.base_url}/jobs/new/"
        form = {
            "csrfmiddlewaretoken": self.csrf(http, "/jobs/new/"), "dataset": dataset_id, "base_model": "custom",
            "custom_base_model": str(base_dir), "method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "lora_target_modules": LLAMA_LINEAR, "learning_rate": 2e-3, "epochs": 1, "max_steps": 12, "batch_size": 4,
            "max_seq_length": 96, "validation_fraction": 0.2, **overrides,
        }
        reply = http.post(url, data=form, headers={"Referer": url})
        match = re.search(r"/jobs/(\d+)/$", reply.url)
        assert match, f"job was not created ({reply.status_code}): {reply.text[:3000]}"
        return int(match.group(1))

    def create_job(self, username: str, state: str = "queued", result: dict | None = None) -> int:
        """A job made straight in the stack's database, which no worker runs (for the pages,
        streams and downloads around one); returns its id."""
        code = (
            "from django.contrib.auth import get_user_model\n"
            "from webapp.datasets.models import Dataset\n"
            "from webapp.jobs.models import Job\n"
            f"owner = get_user_model().objects.get(username={username!r})\n"
            "dataset = Dataset.objects.create(owner=owner, name='d', original_name='d.jsonl', format='jsonl')\n"
            "job = Job.objects.create(owner=owner, dataset=dataset, name='j', spec={'base_model': 'x', 'method': 'lora'})\n"
            "job.append_events([{'kind': 'state', 'step': 0, 't': 0, 'state': 'queued', 'message': ''}])\n"
            f"Job.objects.filter(id=job.id).update(state={state!r}, result={result or {}!r})\n"
            "print(job.id)\n"
        )
        return int(self.manage("shell", "-c", code).split()[-1])

    def post(self, http: requests.Session, path: str) -> requests.Response:
        job_page = re.sub(r"[^/]+/$", "", path)
        token = self.csrf(http, job_page)
        return http.post(f"{self.base_url}{path}", data={"csrfmiddlewaretoken": token},
                         headers={"Referer": f"{self.base_url}{job_page}"})

    # Looking inside -----------------------------------------------------------------------
    def job(self, job_id: int) -> dict:
        """The job row and its event history, read straight from the stack's database."""
        row_sql = "SELECT state, message, attempts, worker_id, result FROM jobs_job WHERE id = {p}"
        events_sql = "SELECT seq, data FROM jobs_jobevent WHERE job_id = {p} ORDER BY seq"
        with self._database() as (connection, p):
            state, message, attempts, worker_id, result = connection.execute(row_sql.format(p=p), (job_id,)).fetchone()
            rows = connection.execute(events_sql.format(p=p), (job_id,)).fetchall()
        events = [{**(json.loads(data) if isinstance(data, str) else data), "seq": seq} for seq, data in rows]
        result = json.loads(result) if isinstance(result, str) else result
        return {"state": state, "message": message, "attempts": attempts, "worker_id": worker_id, "result": result,
                "events": events}

    @contextlib.contextmanager
    def _database(self):
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite"):
            connection = sqlite3.connect(url.removeprefix("sqlite:///"))
            try:
                yield connection, "?"
            finally:
                connection.close()
        else:
            import psycopg

            with psycopg.connect(url) as connection:
                yield connection, "%s"

    def stall_database(self, job_id: int, seconds: float) -> None:
        """Hold a lock for `seconds` that every write to the job waits behind, as a stalled
        database does: SQLite's write lock, or the job's row in PostgreSQL."""
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite"):
            connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
            try:
                connection.execute("BEGIN IMMEDIATE")
                time.sleep(seconds)
                connection.execute("ROLLBACK")
            finally:
                connection.close()
            return
        import psycopg

        with psycopg.connect(url) as connection:
            connection.execute("SELECT id FROM jobs_job WHERE id = %s FOR UPDATE", (job_id,))
            time.sleep(seconds)
            connection.rollback()

    def wait_for(self, job_id: int, condition, timeout: float = 180, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if condition(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never reached {what or condition}: {job['state']}\n{self.all_logs()}")

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{self.log_tail(p.stem)}" for p in sorted(self.logs.glob("*.log")))


def metric_steps(job: dict) -> list[int]:
    return [e["step"] for e in job["events"] if e["kind"] == "metric"]


def states(job: dict) -> list[str]:
    return [e["state"] for e in job["events"] if e["kind"] == "state"]


@contextlib.contextmanager
def running_stack(tmp: Path, redis_url: str, workers: tuple[str, ...] = ("worker",), **env_overrides) -> Iterator[Stack]:
    redis.Redis.from_url(redis_url).flushdb()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with fresh_database(tmp, "e2e") as database_url:
        env = {
            **os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "SPECIALIST_VAR_DIR": str(tmp),
            "SPECIALIST_MEDIA_ROOT": str(tmp / "media"), "PYTHONUNBUFFERED": "1",
            "SPECIALIST_INFERENCE_TOKEN": uuid.uuid4().hex, **env_overrides,
        }
        stack = Stack(base_url=f"http://127.0.0.1:{port}", env=env, media_root=tmp / "media", logs=tmp)
        stack.manage("migrate", "--noinput")
        from webapp.jobs.management.commands.serve import web_command

        stack.processes["web"] = stack._spawn("web", web_command(sys.executable, "127.0.0.1", port))
        for name in workers:
            stack.start_worker(name)
        _wait_until_up(stack)
        try:
            yield stack
        finally:
            for name in list(stack.processes):
                stack.stop(name)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    # Two test runs on one machine (developers working side by side) each name their own database.
    redis_url = os.environ.get("SPECIALIST_TEST_STACK_REDIS", "redis://127.0.0.1:6379/14")
    with running_stack(tmp_path_factory.mktemp("stack"), redis_url) as stack:
        yield stack


def _wait_until_up(stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(f"{stack.base_url}/login/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise RuntimeError("the web server did not start:\n" + stack.log_tail("web"))
