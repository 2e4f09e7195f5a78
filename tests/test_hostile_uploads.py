"""Uploads built to do harm: each is refused clearly, nothing runs, nothing lands outside media."""

import pickle

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset

pytestmark = pytest.mark.django_db

GOOD_ROW = b'{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n'


class Payload:
    """Unpickling this creates the sentinel file: proof that a pickle ran."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def upload(client, name, content):
    return client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content), "task": "sft"})


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["../../escape.jsonl", "..\\..\\escape.jsonl", "a/../../escape.jsonl", "nul\x00.jsonl"])
def test_path_traversal_names_are_stored_under_generated_names(owner_client, media_root, tmp_path, name):
    reply = upload(owner_client, name, GOOD_ROW)
    assert reply.status_code in (302, 400)
    assert not list(tmp_path.glob("escape*")) and not list(media_root.parent.glob("escape*"))
    for path in files_under(media_root):
        assert path.resolve().is_relative_to(media_root.resolve())
        assert "escape" not in path.name and "\x00" not in path.name


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "weights.pkl", "data.pickle", "data.jsonl", "data.parquet"])
def test_a_pickle_payload_is_never_unpickled(owner_client, media_root, tmp_path, name):
    sentinel = tmp_path / "pwned"
    reply = upload(owner_client, name, pickle.dumps(Payload(sentinel)))
    assert reply.status_code == 400
    assert not sentinel.exists()
    assert not Dataset.objects.exists() and not files_under(media_root)


def test_an_html_file_named_csv_is_refused_and_shown_as_text(owner_client, media_root):
    html = b"<html><body><script>alert('x')</script>instruction,response</body></html>\n<p>a</p>\n"
    reply = upload(owner_client, "page.csv", html)
    # Its "columns" are kept for the mapping form (nothing uploaded is lost), but it is rejected.
    assert Dataset.objects.get().status == "rejected"
    page = owner_client.get(reply.url).content
    assert b"<script>alert" not in page and b"&lt;script&gt;alert" in page


def test_formula_strings_stay_plain_text_on_the_page(owner_client, media_root):
    reply = upload(owner_client, "sheet.csv", b'instruction,response\n"=cmd|\' /C calc\'!A0",<b>bold</b>\nx,y\n')
    page = owner_client.get(reply.url).content.decode()
    assert "=cmd|" in page and "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_an_oversized_file_is_refused_and_not_kept(owner_client, media_root, settings):
    settings.MAX_UPLOAD_BYTES = 10_000
    reply = upload(owner_client, "big.jsonl", GOOD_ROW * 1000)
    assert reply.status_code == 400 and "larger than the limit" in reply.content.decode()
    assert not files_under(media_root)
