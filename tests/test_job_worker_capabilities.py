"""The new-job form offers QLoRA and gradient checkpointing only while a live training worker
reports support (worker.capabilities records in Redis), and refuses them otherwise."""

import time

import pytest
import redis
import torch
from django.conf import settings

from webapp.datasets.models import Dataset
from webapp.jobs.models import Job
from worker import capabilities
from worker.announce import Publisher, detect
from worker.capabilities import key, publish

pytestmark = pytest.mark.django_db

VALID = {
    "base_model": "smollm2-135m-instruct", "method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-3, "epochs": 1, "max_steps": 30,
    "batch_size": 8, "max_seq_length": 512, "validation_fraction": 0.1,
}
CPU_WORKER = {"cuda": False, "device": "CPU", "bf16": True, "bitsandbytes": False, "qlora": False,
              "gradient_checkpointing": True}
GPU_WORKER = {"cuda": True, "device": "NVIDIA H100", "bf16": True, "bitsandbytes": True, "qlora": True,
              "gradient_checkpointing": True}


@pytest.fixture
def workers():
    """The test Redis database with no worker records; `publish(name, record)` adds one."""
    client = redis.Redis.from_url(settings.REDIS_URL)

    def clear():
        for stale in client.scan_iter(match=f"{capabilities.KEY_PREFIX}*"):
            client.delete(stale)

    clear()
    yield lambda name, record: publish(client, name, record)
    clear()


@pytest.fixture
def dataset(owner):
    return Dataset.objects.create(owner=owner, name="d", original_name="d.jsonl", format="jsonl", rows_total=10,
                                  rows_ok=10, status="ready")


def post(client, dataset, **overrides):
    return client.post("/jobs/new/", {**VALID, "dataset": dataset.id, **overrides})


def test_without_a_live_worker_neither_option_is_offered(owner_client, dataset, workers):
    page = owner_client.get("/jobs/new/").content.decode()
    assert 'value="qlora"' not in page and 'name="gradient_checkpointing"' not in page


def test_without_a_live_worker_qlora_is_refused_with_a_clear_message(owner_client, dataset, workers, train_queue):
    reply = post(owner_client, dataset, method="qlora")
    [message] = reply.context["form"].errors["method"]
    assert "QLoRA needs a training worker with a CUDA GPU and the bitsandbytes package" in message
    assert "none is running" in message
    assert not Job.objects.exists() and not train_queue()


def test_a_cpu_worker_offers_gradient_checkpointing_but_not_qlora(owner_client, dataset, workers, train_queue):
    workers("train@cpu-box", CPU_WORKER)
    page = owner_client.get("/jobs/new/").content.decode()
    assert 'value="qlora"' not in page and 'name="gradient_checkpointing"' in page
    [message] = post(owner_client, dataset, method="qlora").context["form"].errors["method"]
    assert "the running ones have: CPU" in message
    reply = post(owner_client, dataset, gradient_checkpointing="on")
    assert reply.status_code == 302 and Job.objects.get().spec["gradient_checkpointing"] is True


def test_a_gpu_worker_with_bitsandbytes_offers_qlora(owner_client, dataset, workers, train_queue):
    workers("train@cpu-box", CPU_WORKER)
    workers("train@gpu-box", GPU_WORKER)
    assert 'value="qlora"' in owner_client.get("/jobs/new/").content.decode()
    reply = post(owner_client, dataset, method="qlora")
    assert reply.status_code == 302 and Job.objects.get().spec["method"] == "qlora"


def test_a_worker_that_stopped_renewing_its_record_is_no_longer_counted(owner_client, dataset, workers, train_queue):
    workers("train@gpu-box", GPU_WORKER)
    redis.Redis.from_url(settings.REDIS_URL).pexpire(key("train@gpu-box"), 50)
    time.sleep(0.2)
    assert "QLoRA needs" in post(owner_client, dataset, method="qlora").context["form"].errors["method"][0]


def test_this_machine_reports_what_it_has():
    found = detect()
    assert found["cuda"] == torch.cuda.is_available() and found["gradient_checkpointing"] is True
    if not torch.cuda.is_available():
        assert found["device"] == "CPU" and found["qlora"] is False


def test_a_publisher_keeps_a_record_while_it_runs_and_removes_it_when_stopped(workers):
    client = redis.Redis.from_url(settings.REDIS_URL)
    publisher = Publisher(settings.REDIS_URL, "train@this-box")
    publisher.start()
    deadline = time.monotonic() + 120
    while client.get(key("train@this-box")) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 0 < client.ttl(key("train@this-box")) <= capabilities.TTL_SECONDS
    publisher.stop()
    assert client.get(key("train@this-box")) is None
