"""Fault injection with real processes: duplicate deliveries, cancels across restarts, jobs
that fail, a full disk, and Redis going away mid-training or before a job is queued. One stack
on a private redis-server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import celery
import pytest

from tests.support.model_fixtures import write_jsonl
from tests.support.sse_client import read_events
from tests.support.stack import metric_steps, running_stack, states
from tests.test_classify_recipe import group_rows

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, private_redis):
    with running_stack(
        tmp_path_factory.mktemp("faults"), private_redis.url, SPECIALIST_HEARTBEAT_SECONDS="1",
        SPECIALIST_LEASE_SECONDS="8", SPECIALIST_REAPER_SECONDS="2",
    ) as stack:
        stack.start_cpu_worker()
        stack.create_user("faults")
        yield stack


@pytest.fixture(scope="module")
def http(fault_stack):
    return fault_stack.session("faults")


@pytest.fixture(scope="module")
def dataset_id(fault_stack, http, sft_jsonl):
    return fault_stack.upload_dataset(http, sft_jsonl)


def duplicate_message(stack, job_id):
    app = celery.Celery(broker=stack.env["REDIS_URL"])
    app.send_task("webapp.jobs.train_job", args=[job_id], queue="train")


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_on_a_new_worker(
    fault_stack, http, dataset_id, tiny_llama_dir, tmp_path
):
    # Killed 10 steps past the checkpoint at step 50, with 20 steps to go: it cannot finish first.
    job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=80)
    fault_stack.wait_for(job_id, lambda j: len(metric_steps(j)) >= 60, what="past the checkpoint at step 50")
    fault_stack.stop("worker", kill=True)  # SIGKILL: no goodbye, no ack, the lease just stops
    fault_stack.start_worker()
    job = fault_stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=300, what="the end")
    assert job["state"] == "succeeded", job["message"]
    assert job["attempts"] == 2
    assert metric_steps(job) == list(range(1, 81)), "the loss curve has a gap or a repeated point"
    messages = [e.get("message", "") for e in job["events"]]
    assert any("queued again" in m for m in messages)
    assert any("Resuming from the checkpoint at step 50" in m for m in messages)
    assert sum(1 for e in job["events"] if e["kind"] == "eval" and e.get("baseline")) == 1
    adapter = next((fault_stack.media_root / "jobs" / str(job_id) / "final").glob("adapter_model.safetensors"))
    assert adapter.stat().st_size > 0


def test_a_killed_worker_s_classifier_resumes_from_its_checkpoint_and_reports_each_step_once(
    fault_stack, http, tiny_bert_dir, tmp_path
):
    dataset = fault_stack.upload_dataset(http, write_jsonl(tmp_path / "groups.jsonl", group_rows()), task="classify")
    form = dict(method="full", learning_rate=2e-2, max_steps=150, batch_size=16, max_seq_length=32)
    job_id = fault_stack.submit_job(http, dataset, tiny_bert_dir, **form)
    fault_stack.wait_for(job_id, lambda j: len(metric_steps(j)) >= 55, what="past the checkpoint at step 50")
    fault_stack.stop("worker", kill=True)
    fault_stack.start_worker()
    job = fault_stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=300, what="the end")
    assert job["state"] == "succeeded", job["message"]
    assert job["attempts"] == 2
    assert metric_steps(job) == list(range(1, 151)), "a step was lost or reported twice"
    eval_steps = [e["step"] for e in job["events"] if e["kind"] == "eval"]
    assert eval_steps == sorted(set(eval_steps)), "an evaluation was reported twice"
    assert sum(1 for e in job["events"] if e["kind"] == "eval" and e.get("baseline")) == 1
    resumed = [e["message"] for e in job["events"] if e.get("message", "").startswith("Resuming from the checkpoint")]
    assert len(resumed) == 1 and int(re.search(r"step (\d+)", resumed[0]).group(1)) % 50 == 0
    job_dir = fault_stack.media_root / "jobs" / str(job_id)
    assert (job_dir / "final" / "model.safetensors").is_file()
    assert not list(job_dir.glob("checkpoint-*")), "a finished job keeps no checkpoints"


def test_a_message_delivered_twice_to_two_workers_trains_once(fault_stack, http, dataset_id, tiny_llama_dir):
    fault_stack.start_worker("second")
    try:
        job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=40)
        duplicate_message(fault_stack, job_id)
        job = fault_stack.wait_for(job_id, lambda j: j["state"] == "succeeded", what="succeeded")
        assert states(job).count("preparing") == 1 and job["attempts"] == 1
        assert metric_steps(job) == list(range(1, 41))
        logs = fault_stack.log_tail("worker", 400) + fault_stack.log_tail("second", 400)
        deadline = time.monotonic() + 30
        while f"job {job_id} is" not in logs and time.monotonic() < deadline:
            time.sleep(0.5)
            logs = fault_stack.log_tail("worker", 400) + fault_stack.log_tail("second", 400)
        assert f"job {job_id} is" in logs and "not ours to run" in logs
    finally:
        fault_stack.stop("second")


def test_cancelled_jobs_stay_cancelled_across_worker_restarts(fault_stack, http, dataset_id, tiny_llama_dir):
    running = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=5000)
    queued = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=12)
    fault_stack.wait_for(running, lambda j: len(metric_steps(j)) >= 2, what="training")
    fault_stack.post(http, f"/jobs/{queued}/cancel/")
    fault_stack.post(http, f"/jobs/{running}/cancel/")

    time.sleep(4)  # the worker notices within a heartbeat and stops after the current step
    steps_after_cancel = len(metric_steps(fault_stack.job(running)))
    time.sleep(3)
    assert len(metric_steps(fault_stack.job(running))) == steps_after_cancel, "training went on after the cancel"

    fault_stack.stop("worker")
    fault_stack.start_worker()
    duplicate_message(fault_stack, queued)
    time.sleep(8)
    for job_id in (running, queued):
        job = fault_stack.job(job_id)
        assert job["state"] == "cancelled", job
    assert "preparing" not in states(fault_stack.job(queued))
    assert len(metric_steps(fault_stack.job(running))) == steps_after_cancel
    events = fault_stack.job(running)["events"]
    cancel = next(e["seq"] for e in events if e.get("state") == "cancelled")
    assert [e for e in events if e["seq"] > cancel] == [], "events were recorded after the cancel"
    job_dir = fault_stack.media_root / "jobs" / str(running)
    assert not list(job_dir.rglob("checkpoint-*")) and not list(job_dir.rglob("baseline.json")), (
        "a cancelled job keeps its working files"
    )


def test_a_job_with_bad_data_fails_with_its_message_and_the_next_job_runs(
    fault_stack, http, dataset_id, tiny_llama_dir, sft_jsonl, tmp_path
):
    broken = tmp_path / "late.jsonl"
    broken.write_text(sft_jsonl.read_text())
    broken_id = fault_stack.upload_dataset(http, broken)
    rows = max((fault_stack.media_root / "datasets").glob("*/rows.jsonl"), key=lambda p: p.stat().st_mtime)
    rows.write_text(rows.read_text() + '{"instruction": "cut off\n')  # the file went bad after upload

    bad = fault_stack.submit_job(http, broken_id, tiny_llama_dir)
    good = fault_stack.submit_job(http, dataset_id, tiny_llama_dir)
    job = fault_stack.wait_for(bad, lambda j: j["state"] == "failed", what="failed")
    assert "Line 65" in job["message"] and "not valid JSON" in job["message"]
    assert fault_stack.wait_for(good, lambda j: j["state"] in ("succeeded", "failed"))["state"] == "succeeded"


def test_an_out_of_memory_job_fails_with_a_hint_and_the_next_job_runs(fault_stack, http, dataset_id, tiny_llama_dir):
    from webapp.jobs.management.commands.serve import train_worker_command

    fault_stack.stop("worker")
    command = [sys.executable, "tests/support/oom_worker.py", *train_worker_command(sys.executable, "oom")[5:]]
    fault_stack.start_worker("oom", command)
    try:
        first = fault_stack.submit_job(http, dataset_id, tiny_llama_dir)
        second = fault_stack.submit_job(http, dataset_id, tiny_llama_dir)
        job = fault_stack.wait_for(first, lambda j: j["state"] == "failed", what="failed")
        assert "ran out of memory" in job["message"] and "batch size" in job["message"]
        assert "Traceback" not in job["message"]
        assert fault_stack.wait_for(second, lambda j: j["state"] in ("succeeded", "failed"))["state"] == "succeeded"
    finally:
        fault_stack.stop("oom")
        fault_stack.start_worker()


@pytest.mark.long  # 57 s; a Redis outage longer than the lease stays in make test
def test_redis_restarting_mid_training_loses_no_event(fault_stack, http, dataset_id, tiny_llama_dir, private_redis):
    job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=150)
    received = []
    follower = threading.Thread(
        target=lambda: received.extend(read_events(http, f"{fault_stack.base_url}/jobs/{job_id}/events/", timeout=300))
    )
    follower.start()
    fault_stack.wait_for(job_id, lambda j: len(metric_steps(j)) >= 3, what="training")
    private_redis.stop()
    time.sleep(3)
    private_redis.start()
    follower.join(timeout=300)
    job = fault_stack.wait_for(job_id, lambda j: j["state"] == "succeeded", timeout=60, what="succeeded")
    assert metric_steps(job) == list(range(1, 151))
    assert received == job["events"], "the live page missed or repeated events across the Redis restart"


def test_a_job_that_fills_the_disk_fails_with_a_clear_message_and_nothing_else_is_lost(
    fault_stack, http, dataset_id, tiny_llama_dir
):
    earlier = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=4)
    assert fault_stack.wait_for(earlier, lambda j: j["state"] in ("succeeded", "failed"))["state"] == "succeeded"
    fault_stack.stop("worker")  # the next job waits in the queue while its folder becomes a small disk
    full = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, method="full", max_steps=4)
    after = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=4)
    job_dir = fault_stack.media_root / "jobs" / str(full)
    job_dir.mkdir(parents=True)
    # A full fine-tune's checkpoint (weights and optimizer state, about 40 MB) cannot fit in 16 MB.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(job_dir)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        fault_stack.start_worker()
        job = fault_stack.wait_for(full, lambda j: j["state"] in ("succeeded", "failed"), timeout=300)
        assert job["state"] == "failed"
        assert "disk is full" in job["message"] and "Free space" in job["message"], job["message"]
        assert "Traceback" not in job["message"]
        assert fault_stack.wait_for(after, lambda j: j["state"] in ("succeeded", "failed"))["state"] == "succeeded"
        assert shutil.disk_usage(job_dir).free > 15 * 1024**2, "the failed job's partial checkpoint was left behind"
    finally:
        subprocess.run(["umount", str(job_dir)], check=True)
    for job_id in (earlier, after):
        download = http.get(f"{fault_stack.base_url}/jobs/{job_id}/download/")
        assert download.status_code == 200 and len(download.content) > 0
    assert http.get(f"{fault_stack.base_url}/jobs/{full}/").status_code == 200


def test_a_job_created_while_redis_is_down_waits_and_runs_when_it_is_back(
    fault_stack, http, dataset_id, tiny_llama_dir, private_redis
):
    private_redis.stop()
    try:
        job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=6)
        page = http.get(f"{fault_stack.base_url}/jobs/{job_id}/").text
        assert "Waiting for the queue" in page and 'id="waiting"' in page
        assert 'class="flash warning hidden" id="waiting"' not in page
        assert fault_stack.job(job_id)["state"] == "queued"
    finally:
        private_redis.start()
    job = fault_stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=240, what="the end")
    assert job["state"] == "succeeded", job["message"]
    assert job["attempts"] == 1 and metric_steps(job) == list(range(1, 7))
    assert 'class="flash warning hidden" id="waiting"' in http.get(f"{fault_stack.base_url}/jobs/{job_id}/").text


def attempt_events_after(job: dict, attempt: int, seq: int) -> list[dict]:
    return [e for e in job["events"] if e.get("attempt") == attempt and e["seq"] > seq]


@pytest.mark.long  # 55 s; a killed worker's job resuming elsewhere stays in make test
def test_a_database_stall_longer_than_the_lease_leaves_exactly_one_worker_finishing_the_job(
    fault_stack, http, dataset_id, tiny_llama_dir
):
    fault_stack.start_worker("second")
    try:
        job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=100)
        fault_stack.wait_for(job_id, lambda j: len(metric_steps(j)) >= 55, what="past the checkpoint at step 50")
        fault_stack.stall_database(job_id, seconds=14)  # the lease is 8 s, the grace 4 s
        job = fault_stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=300, what="the end")
        assert job["state"] == "succeeded", job["message"]
        assert job["attempts"] == 2
        assert metric_steps(job) == list(range(1, 101)), "a step was lost or recorded twice"
        assert states(job).count("succeeded") == 1
        requeued = next(e["seq"] for e in job["events"] if "queued again" in e.get("message", ""))
        assert attempt_events_after(job, 1, requeued) == [], "the first attempt wrote after it lost the job"
        logs = fault_stack.log_tail("worker", 600) + fault_stack.log_tail("second", 600)
        assert f"job {job_id}: lease not renewed" in logs
        job_dir = fault_stack.media_root / "jobs" / str(job_id)
        assert (job_dir / "final" / "adapter_model.safetensors").is_file()
        assert json.loads((job_dir / "final" / "train_spec.json").read_text())["output_dir"].endswith("attempt-2")
        assert not list(job_dir.glob("attempt-*")), "a finished job keeps its working folders"
    finally:
        fault_stack.stop("second")


def test_a_redis_outage_longer_than_the_lease_costs_no_attempt_and_no_step(
    fault_stack, http, dataset_id, tiny_llama_dir, private_redis
):
    fault_stack.start_worker("second")
    try:
        job_id = fault_stack.submit_job(http, dataset_id, tiny_llama_dir, max_steps=100)
        fault_stack.wait_for(job_id, lambda j: len(metric_steps(j)) >= 5, what="training")
        private_redis.stop()
        time.sleep(12)  # the lease is 8 s: it lives in the database, not in Redis
        private_redis.start()
        job = fault_stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed"), timeout=300, what="the end")
        assert job["state"] == "succeeded", job["message"]
        assert job["attempts"] == 1 and states(job).count("preparing") == 1
        assert metric_steps(job) == list(range(1, 101))
    finally:
        fault_stack.stop("second")
