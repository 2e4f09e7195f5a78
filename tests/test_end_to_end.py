"""The whole loop through the real stack: upload → job → Celery worker → SSE → download."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.sse_client import read_events

pytestmark = pytest.mark.slow


def test_a_job_trains_streams_resumes_and_downloads(stack, tiny_llama_dir, sft_jsonl, tmp_path):
    stack.create_user("alice")
    http = stack.session("alice")
    dataset_id = stack.upload_dataset(http, sft_jsonl)
    assert "usable" in http.get(f"{stack.base_url}/datasets/{dataset_id}/").text

    job_id = stack.submit_job(http, dataset_id, tiny_llama_dir)
    events_url = f"{stack.base_url}/jobs/{job_id}/events/"

    # Follow the stream, drop the connection after a few loss points, resume by Last-Event-ID.
    first: list[dict] = []
    for event in read_events(http, events_url):
        first.append(event)
        if sum(e["kind"] == "metric" for e in first) >= 3:
            break
    resumed = list(read_events(http, events_url, last_event_id=first[-1]["seq"]))
    received = first + resumed

    seqs = [e["seq"] for e in received]
    assert seqs == list(range(1, len(received) + 1)), "events missing or repeated across the reconnect"
    states = [e["state"] for e in received if e["kind"] == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded", (states, stack.log_tail("worker"))
    assert [s for s in ("preparing", "training", "exporting") if s in states] == ["preparing", "training", "exporting"]
    steps = [e["step"] for e in received if e["kind"] == "metric"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 12
    assert any(e["kind"] == "eval" for e in received)
    census = next(e for e in received if e["kind"] == "params")
    assert 0 < census["trainable"] < census["total"]

    # The durable history (a fresh connection after the end) is exactly what was streamed.
    assert list(read_events(http, events_url)) == received

    page = http.get(f"{stack.base_url}/jobs/{job_id}/").text
    assert "succeeded" in page and f"/jobs/{job_id}/download/" in page

    reply = http.get(f"{stack.base_url}/jobs/{job_id}/download/")
    assert reply.status_code == 200
    assert "attachment" in reply.headers["Content-Disposition"]
    unzipped = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(reply.content)).extractall(unzipped)
    adapter_dir = next(p.parent for p in unzipped.rglob("adapter_config.json"))
    for name in ("adapter_model.safetensors", "README.md", "tokenizer_config.json"):
        assert (adapter_dir / name).is_file(), name
    saved = next((stack.media_root / "jobs" / str(job_id)).rglob("adapter_model.safetensors"))
    check = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "support" / "load_adapter.py"), str(tiny_llama_dir), str(adapter_dir), str(saved)],
        capture_output=True, text=True, timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "weights equal" in check.stdout and "generated" in check.stdout


def test_another_user_cannot_see_the_job_or_its_stream(stack, tiny_llama_dir, sft_jsonl):
    stack.create_user("carol")
    stack.create_user("dave")
    carol, dave = stack.session("carol"), stack.session("dave")
    job_id = stack.submit_job(carol, stack.upload_dataset(carol, sft_jsonl), tiny_llama_dir, max_steps=2)
    for path in ("", "events/", "download/"):
        assert dave.get(f"{stack.base_url}/jobs/{job_id}/{path}", timeout=10).status_code == 404
    list(read_events(carol, f"{stack.base_url}/jobs/{job_id}/events/"))
