"""The official `openai` client drives the fine-tuning loop against the live stack (uvicorn, the
database, Redis, the Celery worker that trains): upload a chat file and a preference file in
OpenAI's formats, start a supervised and a DPO job, page through jobs and events, cancel one,
wait for the other, read its checkpoint and result file; a classifier and an embedding model
through `extra_body`; and (with the inference server, `make test-long`) chat with the
fine-tuned model by the name the job reports. Code written for OpenAI changes only base_url."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.support.model_fixtures import number_word
from tests.test_classify_recipe import group_rows
from tests.test_embed_recipe import tag_rows

pytestmark = pytest.mark.slow

USER = "ci-robot"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


CHAT = jsonl([{"messages": [{"role": "user", "content": f"Say the word for {n}."},
                            {"role": "assistant", "content": f"WORD: {number_word(n)}."}]} for n in range(48)])
PREFERENCES = jsonl([{"input": {"messages": [{"role": "user", "content": f"Say {number_word(n)}."}]},
                      "preferred_output": [{"role": "assistant", "content": f"{number_word(n)}!"}],
                      "non_preferred_output": [{"role": "assistant", "content": f"{number_word(n)}?"}]}
                     for n in range(24)])


def wait(client: openai.OpenAI, job_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
    raise AssertionError(f"{job_id} is still {job.status} after {timeout} s")


@pytest.fixture(scope="module")
def api(stack):
    stack.create_user(USER)
    key = stack.manage("apikey", USER).strip()
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loop(api, stack, tiny_llama_dir):
    """The loop a script written for OpenAI runs, on the tiny llama."""
    chat = api.files.create(file=("words.jsonl", io.BytesIO(CHAT)), purpose="fine-tune")
    pairs = api.files.create(file=("pairs.jsonl", io.BytesIO(PREFERENCES)), purpose="fine-tune")
    chat, pairs = (api.files.wait_for_processing(f.id, poll_interval=0.5, max_wait_seconds=60) for f in (chat, pairs))
    tuned = api.fine_tuning.jobs.create(
        model=str(tiny_llama_dir), training_file=chat.id, suffix="words", seed=3, metadata={"suite": "client"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "batch_size": 4, "learning_rate_multiplier": 10}}},
        extra_body={"specialist": {"max_steps": 16, "max_seq_length": 96, "lora_r": 8, "lora_alpha": 16,
                                   "lora_dropout": 0.0, "lora_target_modules": LLAMA_LINEAR,
                                   "validation_fraction": 0.2}})
    preferred = api.fine_tuning.jobs.create(
        model=str(tiny_llama_dir), training_file=pairs.id, metadata={"suite": "client"},
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        extra_body={"specialist": {"max_steps": 8, "max_seq_length": 64}})
    cancelled = api.fine_tuning.jobs.cancel(preferred.id)
    done = wait(api, tuned.id)
    assert done.status == "succeeded", (done.error, stack.log_tail("worker"))
    return {"files": (chat, pairs), "created": (tuned, preferred), "cancelled": cancelled, "done": done}


def test_files_in_openais_two_formats_are_read_and_listed(api, loop):
    chat, pairs = loop["files"]
    assert chat.status == pairs.status == "processed" and chat.purpose == "fine-tune"
    assert chat.bytes == len(CHAT) and chat.filename == "words.jsonl"
    assert (chat.specialist["task"], pairs.specialist["task"]) == ("sft", "dpo")
    listed = [f.id for f in api.files.list(purpose="fine-tune")]
    assert listed[:2] == [pairs.id, chat.id]
    assert api.files.content(chat.id).read() == CHAT
    with pytest.raises(openai.BadRequestError, match="used by a fine-tuning job"):
        api.files.delete(chat.id)


def test_a_supervised_job_trains_through_the_worker_and_reports_like_openai(api, loop):
    tuned, _ = loop["created"]
    done = loop["done"]
    assert tuned.status == "queued" and tuned.fine_tuned_model is None and tuned.finished_at is None
    assert done.fine_tuned_model == f"ft:{done.model}:{USER}:words:{done.id.removeprefix('ftjob-')}"
    assert done.hyperparameters.batch_size == 4 and done.hyperparameters.learning_rate_multiplier == 10
    assert done.seed == 3 and done.metadata == {"suite": "client"} and done.trained_tokens > 0
    assert done.finished_at >= done.created_at and done.error is None
    before, after = done.specialist["metrics_before"], done.specialist["metrics_after"]
    assert after["eval_loss"] < before["eval_loss"] / 2, (before, after)

    # Events, newest first, paged by the client: the step metrics in data.
    events = list(api.fine_tuning.jobs.list_events(done.id, limit=5))
    assert len(events) > 5 and events[0].created_at >= events[-1].created_at
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(steps) == list(range(1, 17))
    assert events[-1].message == "Job queued"

    checkpoint = next(iter(api.fine_tuning.jobs.checkpoints.list(done.id)))
    assert checkpoint.fine_tuned_model_checkpoint == done.fine_tuned_model and checkpoint.step_number == 16
    results = api.files.content(done.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss,valid_loss,learning_rate,tokens" and len(results) == 1 + 16 + 1  # + step 0


def test_a_job_is_cancelled_once_and_jobs_page_newest_first(api, loop):
    tuned, preferred = loop["created"]
    assert loop["cancelled"].status == "cancelled" and loop["cancelled"].method.type == "dpo"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        api.fine_tuning.jobs.cancel(preferred.id)
    page = api.fine_tuning.jobs.list(limit=1)
    assert page.has_more and [j.id for j in page.data] == [preferred.id]
    every = [job.id for job in api.fine_tuning.jobs.list(limit=1, metadata={"suite": "client"})]  # auto-paging
    assert every == [preferred.id, tuned.id]


def test_the_browser_shows_the_job_the_api_made(api, loop, stack):
    done = loop["done"]
    page = stack.session(USER).get(f"{stack.base_url}{done.specialist['url']}").text
    assert done.specialist["name"] in page and "succeeded" in page


def test_bad_requests_raise_the_clients_errors_and_create_nothing(api, loop, tiny_llama_dir):
    chat, _ = loop["files"]
    before = len(list(api.fine_tuning.jobs.list()))
    problems = [
        dict(training_file="file-999999"),
        dict(training_file=chat.id, method={"type": "reinforcement"}),
        dict(training_file=chat.id, hyperparameters={"n_epochs": -1}),
    ]
    for problem in problems:
        with pytest.raises(openai.BadRequestError) as raised:
            api.fine_tuning.jobs.create(model=str(tiny_llama_dir), **problem)
        assert raised.value.param in ("training_file", "method.type", "hyperparameters.n_epochs")
    with pytest.raises(openai.BadRequestError) as raised:
        api.files.create(file=("x.jsonl", io.BytesIO(CHAT)), purpose="assistants")
    assert raised.value.param == "purpose"
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("ftjob-999999")
    assert len(list(api.fine_tuning.jobs.list())) == before


@pytest.mark.learning
def test_a_classifier_and_an_embedding_model_through_extra_body(api, stack, tiny_bert_dir):
    classes = api.files.create(file=("groups.jsonl", io.BytesIO(jsonl(group_rows()))), purpose="fine-tune")
    pairs = api.files.create(file=("tags.jsonl", io.BytesIO(jsonl(tag_rows()))), purpose="fine-tune",
                             extra_body={"task": "embed"})
    assert (classes.specialist["task"], pairs.specialist["task"]) == ("classify", "embed")
    jobs = [
        api.fine_tuning.jobs.create(model=str(tiny_bert_dir), training_file=classes.id, extra_body={"specialist": {
            "method": "full", "learning_rate": 2e-2, "max_steps": 40, "max_seq_length": 32}},
            hyperparameters={"batch_size": 16}),
        api.fine_tuning.jobs.create(model=str(tiny_bert_dir), training_file=pairs.id, extra_body={"specialist": {
            "method": "full", "learning_rate": 1e-3, "max_steps": 20, "max_seq_length": 32,
            "validation_fraction": 0.25}}, hyperparameters={"batch_size": 16}),
    ]
    for job, metric in zip(jobs, ("accuracy", "recall@1"), strict=True):
        done = wait(api, job.id)
        assert done.status == "succeeded", (done.error, stack.log_tail("worker"))
        assert done.specialist["task"] == ("classify" if metric == "accuracy" else "embed")
        assert done.specialist["metrics_after"][metric] >= 0.9 > done.specialist["metrics_before"][metric]


@pytest.mark.serving
def test_the_fine_tuned_model_answers_by_the_name_the_job_reports(api, loop, stack):
    stack.start_inference()
    reply = api.chat.completions.create(model=loop["done"].fine_tuned_model, temperature=0, max_tokens=10,
                                        messages=[{"role": "user", "content": "Say the word for 7."}])
    assert reply.choices[0].message.content.startswith("WORD:"), reply.choices[0].message.content


@pytest.mark.serving
def test_the_readmes_move_from_openai_script_runs_as_written(api, stack, tiny_llama_dir, tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Move from OpenAI fine-tuning", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "train.jsonl").write_bytes(CHAT)
    (tmp_path / "move.py").write_text(script)
    stack.start_inference()
    env = {**os.environ, "SPECIALIST_URL": f"{stack.base_url}/v1", "SPECIALIST_API_KEY": api.api_key,
           "BASE_MODEL": str(tiny_llama_dir)}
    done = subprocess.run([sys.executable, "move.py", "Say the word for 7."], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("started ftjob-") and "Job succeeded" in lines
    assert any(line.startswith("Step 30/30: training loss=") for line in lines)  # the form's suggested steps
    assert lines[-1].startswith(f"ft:{tiny_llama_dir.name}:{USER}:rewriter:") and " says: " in lines[-1]
