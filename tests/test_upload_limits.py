"""The upload limit holds for a whole request: many files each under it, or a training file and a
validation file that fit apart, are refused together on the form and nothing of them is kept."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db

ROWS = b"".join(b'{"instruction": "say %d", "response": "%d"}\n' % (n, n) for n in range(100, 150))  # 2,300 bytes
LIMIT = 10_000


@pytest.fixture
def limits(settings, tmp_path):
    """A small upload limit, and every uploaded file spooled to a folder the test can look in."""
    settings.MAX_UPLOAD_BYTES = LIMIT
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 0
    settings.FILE_UPLOAD_TEMP_DIR = tmp_path / "spool"
    settings.FILE_UPLOAD_TEMP_DIR.mkdir()
    return settings


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_many_files_each_under_the_limit_are_refused_together(owner_client, media_root, limits):
    files = {f"extra{number}": SimpleUploadedFile(f"part{number}.jsonl", ROWS) for number in range(10)}
    reply = owner_client.post(
        "/datasets/upload/", {"file": SimpleUploadedFile("d.jsonl", ROWS), "task": "sft", **files}
    )
    assert reply.status_code == 400
    assert "larger than the limit of 9.8\xa0KB" in reply.content.decode()
    assert "all its files together" in reply.content.decode()
    assert not Dataset.objects.exists()
    assert not files_under(media_root) and not files_under(limits.FILE_UPLOAD_TEMP_DIR)


def test_a_training_and_a_validation_file_over_the_limit_together_are_not_kept(owner_client, media_root, limits):
    half = ROWS * 3  # 6,900 bytes: each fits, both do not
    reply = owner_client.post(
        "/datasets/upload/",
        {
            "file": SimpleUploadedFile("d.jsonl", half),
            "validation_file": SimpleUploadedFile("v.jsonl", half),
            "task": "sft",
        },
    )
    assert reply.status_code == 400 and "all its files together" in reply.content.decode()
    assert not Dataset.objects.exists() and not files_under(media_root)


def test_files_that_fit_together_are_stored(owner_client, media_root, limits):
    reply = owner_client.post(
        "/datasets/upload/",
        {
            "file": SimpleUploadedFile("d.jsonl", ROWS),
            "validation_file": SimpleUploadedFile("v.jsonl", ROWS),
            "task": "sft",
        },
    )
    assert reply.status_code == 302
    assert Dataset.objects.get().validation_rows_ok == 50


def test_a_validation_file_over_the_limit_on_the_dataset_page_is_refused_with_the_limit(
    owner_client, media_root, limits
):
    owner_client.post("/datasets/upload/", {"file": SimpleUploadedFile("d.jsonl", ROWS), "task": "sft"})
    dataset = Dataset.objects.get()
    extra = {f"extra{number}": SimpleUploadedFile(f"p{number}.jsonl", ROWS) for number in range(4)}
    reply = owner_client.post(
        f"/datasets/{dataset.id}/validation/", {"file": SimpleUploadedFile("v.jsonl", ROWS), **extra}
    )
    assert reply.status_code == 400 and "all its files together" in reply.content.decode()
    dataset.refresh_from_db()
    assert not dataset.has_validation
    assert files_under(media_root) == files_under(dataset.rows_path.parent)
    assert not files_under(limits.FILE_UPLOAD_TEMP_DIR)
