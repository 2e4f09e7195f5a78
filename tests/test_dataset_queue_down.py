"""Redis down when a large upload is queued to be read: the upload is kept and its page says it
waits for the queue; the periodic resend sends it once the broker is back, and a real "cpu"
worker reads it."""

import json
import time
from unittest import mock

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from kombu.exceptions import OperationalError

from tests.support.redis_server import PrivateRedis
from tests.support.stack import running_stack
from webapp.datasets.models import Dataset
from webapp.datasets.tasks import resend_waiting_datasets

INLINE_LIMIT = 4096
ROWS = "".join(json.dumps({"instruction": f"say {n}", "response": f"{n}"}) + "\n" for n in range(400))


def upload(client):
    return client.post("/datasets/upload/", {"file": SimpleUploadedFile("big.jsonl", ROWS.encode()), "task": "sft"})


@pytest.mark.django_db
def test_an_upload_queued_while_the_broker_is_down_is_kept_and_sent_again(
    owner_client, media_root, settings, django_capture_on_commit_callbacks
):
    settings.INLINE_PARSE_BYTES = INLINE_LIMIT
    down = mock.patch("webapp.celery.app.send_task", side_effect=OperationalError("Connection refused"))
    with down, django_capture_on_commit_callbacks(execute=True):
        reply = upload(owner_client)
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and reply.url == f"/datasets/{dataset.id}/"
    assert dataset.status == "uploaded" and dataset.waits_for_queue and dataset.original.path
    assert "Waiting for the queue" in owner_client.get(reply.url).content.decode()

    with mock.patch("webapp.celery.app.send_task") as send:
        resend_waiting_datasets()
        resend_waiting_datasets()  # sent once: it no longer waits for the queue
    send.assert_called_once_with(
        "webapp.datasets.parse_dataset", args=[dataset.id], queue="cpu", retry_policy={"max_retries": 1}
    )
    dataset.refresh_from_db()
    assert not dataset.waits_for_queue
    assert "Waiting for the queue" not in owner_client.get(reply.url).content.decode()


@pytest.mark.slow
def test_a_large_upload_while_redis_is_down_is_read_once_it_is_back(tmp_path):
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    try:
        with running_stack(
            tmp_path / "stack",
            redis_server.url,
            workers=(),
            SPECIALIST_INLINE_PARSE_BYTES=str(INLINE_LIMIT),
            SPECIALIST_REAPER_SECONDS="1",
        ) as stack:
            stack.create_user("dana")
            http = stack.session("dana")
            path = tmp_path / "big.jsonl"
            path.write_text(ROWS)
            redis_server.stop()
            dataset_id = stack.upload_dataset(http, path)  # a redirect to its page, not a 500
            page = http.get(f"{stack.base_url}/datasets/{dataset_id}/").text
            assert "Waiting for the queue" in page and "waiting to be read" in page

            redis_server.start()
            stack.start_cpu_worker()
            status_url = f"{stack.base_url}/datasets/{dataset_id}/status/"
            deadline = time.monotonic() + 60
            while (status := http.get(status_url).json())["busy"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert status["status"] == "ready", stack.all_logs()
            assert "400 usable" in http.get(f"{stack.base_url}/datasets/{dataset_id}/").text
    finally:
        if redis_server.process.poll() is None:
            redis_server.stop()
