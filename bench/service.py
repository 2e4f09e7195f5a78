"""Service benchmark: the job path through the real stack, as a user meets it.

``python -m bench.service`` (the second part of ``make bench``) starts the app as a user runs it
(bench.served: ``manage.py serve``, i.e. uvicorn, a Celery training worker and a CPU worker, on
Redis and a fresh database) and measures:

(a) submit → first training step: the new-job form's defaults (SmolLM2-135M-Instruct, LoRA) on
    the SFT sample data, posted through the form; the time from the POST to the `metric` event
    of step 1, split at the worker's claim and the start of training. Twice: the first job of a
    freshly started worker, then a second one. The model cache is warm (``make models``).
(b) worker step end → SSE client: every event carries the worker's clock (`t`, stamped when the
    recipe emits it, right after the optimizer step for a `metric`); the client notes when it
    parsed the event. Same machine, same clock. p50 / p95 / max over a short job's events.
(c) 200 SSE clients following one job: every client must get every event, in order, without a
    gap or a repeat; the web server's CPU time (utime + stime of the uvicorn process from
    /proc) over the job; the job's training speed against the same job followed by one client.
    The short job runs four times, followed by 1, 200, 200 and 1 clients: the order cancels a
    steady drift in the machine's speed, and each side's step time is the median of its two
    jobs' steps. The 200 clients run in this process, on the same cores as the worker: their
    own CPU time is printed beside the server's.

Results go to stdout and var/bench/service.json; docs/performance.md says what they mean. The
app's Redis database is flushed first: SPECIALIST_BENCH_REDIS names it (default database 13).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from bench.served import ServedApp, served_app
from worker.capabilities import KEY_PREFIX
from worker.catalog import DEFAULT_BASE_MODEL
from worker.models import REPO_ROOT
from worker.spec import TrainChoices

WORK_DIR = REPO_ROOT / "var" / "bench"
FINAL = ("succeeded", "failed", "cancelled")
GOALS = {"first_step_s": 10.0, "latency_p95_s": 0.25, "web_cpu_cores": 1.0, "throughput_loss": 0.05}
# The form's defaults for instruction tuning (what a user who changes nothing submits).
FORM_FIELDS = (
    "method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "epochs", "max_steps",
    "batch_size", "max_seq_length", "validation_fraction", "dpo_beta", "dpo_sft_weight",
)  # fmt: skip
DEFAULT_FORM = {"base_model": DEFAULT_BASE_MODEL} | {name: TrainChoices.defaults()[name] for name in FORM_FIELDS}
# A short job for (b) and (c): short steps, no evaluation.
STREAM_JOB = {"max_steps": 24, "batch_size": 4, "max_seq_length": 96, "validation_fraction": 0}


# A Server-Sent Events client on asyncio: hundreds of them in one process ---------------------


@dataclass
class Follower:
    """One SSE connection: every event it received, with the time it was parsed."""

    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    connected_at: float = 0.0
    error: str = ""

    async def follow(self, base_url: str, path: str, cookie: str) -> None:
        url = urlparse(base_url)
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nCookie: {cookie}\r\n"
                "Accept: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode())
            await self._read(reader)
            writer.close()
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def _read(self, reader: asyncio.StreamReader) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if " 200 " not in head.split("\r\n", 1)[0]:
            raise ValueError(head.split("\r\n", 1)[0])
        self.connected_at = time.time()
        chunked = "transfer-encoding: chunked" in head.lower()
        buffer = ""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    return
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
            buffer += data.decode()
            *blocks, buffer = buffer.split("\n\n")
            for block in blocks:
                if self._event(block):
                    return

    def _event(self, block: str) -> bool:
        """Record one SSE block; True at the server's `end`."""
        lines = block.split("\n")
        if "event: end" in lines:
            return True
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        if data:
            self.received.append((time.time(), json.loads("\n".join(data))))
        return False


async def follow_all(app: ServedApp, job_id: int, cookie: str, clients: int) -> list[Follower]:
    followers = [Follower() for _ in range(clients)]
    path = f"/jobs/{job_id}/events/"
    await asyncio.gather(*(f.follow(app.base_url, path, cookie) for f in followers))
    return followers


# The served app's processes --------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_capabilities(app: ServedApp, timeout: float = 180) -> dict[str, Any]:
    """The training worker's published capabilities: it has started and imported torch."""
    client = redis.Redis.from_url(app.env["REDIS_URL"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in client.scan_iter(match=f"{KEY_PREFIX}*:capabilities"):
            value = client.get(key)
            if value:
                return json.loads(value)
        time.sleep(0.5)
    raise RuntimeError("the training worker published no capabilities:\n" + app.log_tail())


def sample_dataset(app: ServedApp, http) -> int:
    """The SFT sample data, through the page's "try with sample data" button."""
    url = f"{app.base_url}/datasets/samples/sft/"
    reply = http.post(url, data={"csrfmiddlewaretoken": app.csrf(http, "/jobs/new/")}, headers={"Referer": url})
    return int(reply.url.rsplit("dataset=", 1)[1])


def submit(app: ServedApp, http, dataset_id: int, **overrides) -> tuple[int, float]:
    """Post the new-job form; (job id, the time just before the POST)."""
    url = f"{app.base_url}/jobs/new/"
    form = {"csrfmiddlewaretoken": app.csrf(http, "/jobs/new/"), "dataset": dataset_id, **DEFAULT_FORM, **overrides}
    submitted = time.time()
    reply = http.post(url, data=form, headers={"Referer": url})
    if "/jobs/new/" in reply.url:
        raise RuntimeError(f"the job was refused: {reply.text[:2000]}")
    return int(reply.url.rstrip("/").rsplit("/", 1)[1]), submitted


def wait_until_idle(app: ServedApp, tasks_done: int, timeout: float = 300) -> None:
    """Until the training worker has finished `tasks_done` jobs (a cancelled job's worker stops at
    its next step, after the job's row already says cancelled)."""
    deadline = time.monotonic() + timeout
    while app.training_jobs_done() < tasks_done:
        if time.monotonic() > deadline:
            raise RuntimeError("the training worker did not finish its job:\n" + app.log_tail())
        time.sleep(0.5)


def event_time(job: dict, kind: str, **match: Any) -> float:
    return next(e["t"] for e in job["events"] if e["kind"] == kind and all(e.get(k) == v for k, v in match.items()))


# The three measurements -------------------------------------------------------------------------


def first_step(app: ServedApp, http, dataset_id: int) -> dict[str, float]:
    """(a) One default job from POST to its first metric; then it is cancelled."""
    job_id, submitted = submit(app, http, dataset_id)
    job = app.wait_for(job_id, lambda j: any(e["kind"] == "metric" for e in j["events"]) or j["state"] in FINAL,
                         timeout=600, what="its first step")  # fmt: skip
    app.post(http, f"/jobs/{job_id}/cancel/")
    app.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=300, what="a final state")
    claimed = event_time(job, "state", state="preparing")
    training = event_time(job, "state", state="training")
    stepped = event_time(job, "metric", step=1)
    return {
        "submit_to_first_step_s": stepped - submitted,
        "submit_to_claim_s": claimed - submitted,
        "claim_to_training_s": training - claimed,
        "first_step_s": stepped - training,
    }


def streamed_job(app: ServedApp, http, dataset_id: int, clients: int) -> dict[str, Any]:
    """(b) and (c): one short job followed by `clients` SSE clients from the moment it is queued."""
    cookie = "; ".join(f"{name}={value}" for name, value in http.cookies.items())
    web_pid = app.web_pid()
    job_id, _ = submit(app, http, dataset_id, **STREAM_JOB)
    cpu_before, wall_before, load_before = cpu_seconds(web_pid), time.time(), os.getloadavg()[0]
    own_before = time.process_time()
    followers = asyncio.run(follow_all(app, job_id, cookie, clients))
    web_cpu, wall = cpu_seconds(web_pid) - cpu_before, time.time() - wall_before
    clients_cpu = time.process_time() - own_before
    job = app.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=60, what="a final state")
    expected = [e["seq"] for e in job["events"]]
    complete = [f for f in followers if [event["seq"] for _, event in f.received] == expected]
    # Latency only of events emitted while the client was connected: replayed history is old news.
    live = sorted(received - event["t"] for f in followers for received, event in f.received
                  if event["t"] > f.connected_at)  # fmt: skip
    steps = {e["step"]: e["t"] for e in job["events"] if e["kind"] == "metric"}
    step_seconds = [steps[s] - steps[s - 1] for s in sorted(steps) if s - 1 in steps and s > 1]
    return {
        "job_state": job["state"],
        "clients": clients,
        "events": len(expected),
        "clients_with_every_event_in_order": len(complete),
        "client_errors": sorted({f.error for f in followers if f.error}),
        "log_errors": [line for line in app.log_tail(400).splitlines() if "Error" in line][-10:],
        "latencies_s": live,
        "web_cpu_s": web_cpu,
        "clients_cpu_s": clients_cpu,
        "wall_s": wall,
        "step_seconds": step_seconds,
        "step_seconds_median": statistics.median(step_seconds),
        "load_average": [load_before, os.getloadavg()[0]],
    }


def combined(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The streamed jobs with the same number of clients, as one: pooled steps and latencies,
    the worst delivery, the busiest server."""
    live = sorted(latency for job in jobs for latency in job["latencies_s"])
    steps = [seconds for job in jobs for seconds in job["step_seconds"]]
    return {
        "jobs": len(jobs),
        "job_states": [job["job_state"] for job in jobs],
        "clients": jobs[0]["clients"],
        "events": min(job["events"] for job in jobs),
        "clients_with_every_event_in_order": min(job["clients_with_every_event_in_order"] for job in jobs),
        "client_errors": sorted({error for job in jobs for error in job["client_errors"]}),
        "log_errors": [line for job in jobs for line in job["log_errors"]][-10:],
        "latency_p50_s": _percentile(live, 0.50),
        "latency_p95_s": _percentile(live, 0.95),
        "latency_max_s": max(live, default=float("nan")),
        "latency_samples": len(live),
        "web_cpu_cores": max(job["web_cpu_s"] / job["wall_s"] for job in jobs),
        "clients_cpu_cores": max(job["clients_cpu_s"] / job["wall_s"] for job in jobs),
        "step_seconds_median": statistics.median(steps),
        "step_seconds_median_per_job": [job["step_seconds_median"] for job in jobs],
        "load_average": [job["load_average"] for job in jobs],
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# Output ---------------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(results: dict[str, Any]) -> None:
    print(f"worker: {results['worker']}")
    for name in ("first_job", "second_job"):
        a = results[name]
        goal = a["submit_to_first_step_s"] < GOALS["first_step_s"]
        print(
            f"(a) {name.replace('_', ' ')}: submit → first step {a['submit_to_first_step_s']:.1f} s "
            f"(goal < {GOALS['first_step_s']:g} s: {verdict(goal)}) = claim {a['submit_to_claim_s']:.1f} s + "
            f"preparing {a['claim_to_training_s']:.1f} s (model, data, adapters; a LoRA job measures its step-0 baseline after step 1) + "
            f"step 1 {a['first_step_s']:.1f} s"
        )
    one, many = results["one_client"], results["many_clients"]
    print(
        f"(b) step end → SSE client: p50 {one['latency_p50_s'] * 1000:.0f} ms, p95 "
        f"{one['latency_p95_s'] * 1000:.0f} ms (goal < {GOALS['latency_p95_s'] * 1000:.0f} ms: "
        f"{verdict(one['latency_p95_s'] < GOALS['latency_p95_s'])}), max {one['latency_max_s'] * 1000:.0f} ms "
        f"over {one['latency_samples']} events; with {many['clients']} clients p95 "
        f"{many['latency_p95_s'] * 1000:.0f} ms"
    )
    loss = many["step_seconds_median"] / one["step_seconds_median"] - 1
    print(
        f"(c) {many['clients']} clients: {many['clients_with_every_event_in_order']} got all {many['events']} events "
        f"in order, in each of {many['jobs']} jobs ({verdict(many['clients_with_every_event_in_order'] == many['clients'])}); web server CPU "
        f"{many['web_cpu_cores']:.2f} cores (goal < {GOALS['web_cpu_cores']:g}: "
        f"{verdict(many['web_cpu_cores'] < GOALS['web_cpu_cores'])}; 1 client: {one['web_cpu_cores']:.2f}); "
        f"step {many['step_seconds_median']:.2f} s vs {one['step_seconds_median']:.2f} s with 1 client (median of "
        f"{one['jobs']} jobs each, run 1-{many['clients']}-{many['clients']}-1): {loss:+.1%} "
        f"(goal < {GOALS['throughput_loss']:.0%} slower: {verdict(loss < GOALS['throughput_loss'])})"
    )
    per_job = ", ".join(f"{s:.2f}" for s in results["streamed_step_medians"])
    print(f"    per job, in order: {per_job} s; the {many['clients']} clients themselves (this process, same cores): "
          f"{many['clients_cpu_cores']:.2f} cores")
    if many["client_errors"]:
        print(f"    client errors: {many['client_errors']}; serve's log: {many['log_errors']}")
    print(f"    load average during the jobs: {one['load_average']} (1 client), {many['load_average']} (many)")


def measure(tmp: Path, redis_url: str, clients: int) -> dict[str, Any]:
    results = {}
    # One user follows the job from every client: the per-user stream limit is raised to fit.
    limits = {"SPECIALIST_MAX_STREAMS_PER_USER": str(clients + 1)}
    with served_app(tmp, redis_url, **limits) as app:
        results["worker"] = wait_for_capabilities(app)
        app.create_user("bench")
        http = app.session("bench")
        dataset_id = sample_dataset(app, http)
        results["first_job"] = first_step(app, http, dataset_id)
        wait_until_idle(app, 1)
        results["second_job"] = first_step(app, http, dataset_id)
        wait_until_idle(app, 2)
        streamed = []
        for count in (1, clients, clients, 1):
            streamed.append(streamed_job(app, http, dataset_id, clients=count))
            wait_until_idle(app, 2 + len(streamed))
    results["one_client"] = combined([job for job in streamed if job["clients"] == 1])
    results["many_clients"] = combined([job for job in streamed if job["clients"] == clients])
    results["streamed_step_medians"] = [job["step_seconds_median"] for job in streamed]
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="SSE clients following one job in (c)")
    args = parser.parse_args(argv)
    redis_url = os.environ.get("SPECIALIST_BENCH_REDIS", "redis://127.0.0.1:6379/13")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
        results |= measure(Path(tmp), redis_url, args.clients)
    results["wall_s"] = time.time() - started
    (WORK_DIR / "service.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"{results['wall_s'] / 60:.1f} minutes; results in {WORK_DIR / 'service.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
