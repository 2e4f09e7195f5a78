"""Plain-text documents as a dataset: .txt and .md files, and zips of them read in streaming, never
extracted, each hostile zip refused with a message that names the member."""

import io
import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets import documents
from webapp.datasets.models import Dataset
from webapp.datasets.parsing import parse_dataset, sniff_format, unpacked_size


def parse(tmp_path: Path, name: str, content: bytes, **options):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "rows.jsonl"
    report = parse_dataset(path, name, task="domain", out_path=out, **options)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return report, rows


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=method) as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, content)
    return sink.getvalue()


@pytest.mark.parametrize("name", ["notes.txt", "README.md"])
def test_a_text_or_markdown_file_is_one_document(tmp_path, name):
    text = "# Pumps\n\nA centrifugal pump moves fluid.\n\nPrime it before starting.\n"
    report, rows = parse(tmp_path, name, ("\ufeff" + text).encode())
    assert (report.fatal, report.format, report.columns, report.mapping) == (None, "text", ["text"], {"text": "text"})
    assert rows == [{"text": text}]  # verbatim, without the byte order mark


def test_a_text_file_holding_json_rows_is_still_read_as_rows(tmp_path):
    path = tmp_path / "upload"
    path.write_text('{"text": "a row"}\n')
    assert sniff_format(path, "rows.txt") == "jsonl"


def test_a_zip_of_documents_is_read_one_record_per_document_skipping_folders_and_hidden_files(tmp_path):
    content = zip_of({
        "manual/": b"",
        "manual/intro.md": b"# Intro\nThe valve opens.",
        "manual/.DS_Store": b"\x00\x01binary",
        "__MACOSX/manual/._intro.md": b"\x00\x05\x16\x07",
        "manual/safety.txt": "Wear gloves. Caf\u00e9 rules apply.".encode(),
        "manual/empty.txt": b"  \n",
        "manual/diagram.png": b"\x89PNG",
    })  # fmt: skip
    report, rows = parse(tmp_path, "manual.zip", content)
    assert report.fatal is None and report.format == "zip"
    assert rows == [{"text": "# Intro\nThe valve opens."}, {"text": "Wear gloves. Caf\u00e9 rules apply."}]
    assert [(error.line, error.problem) for error in report.errors] == [
        (3, "manual/empty.txt is empty"),
        (4, "manual/diagram.png is not a .txt or .md document, so it was skipped"),
    ]
    assert (report.rows_total, report.rows_ok) == (4, 2)


def test_a_long_document_is_split_at_line_breaks(tmp_path):
    text = "".join(f"line {n:04d} of the long document\n" for n in range(1000))
    report, rows = parse(tmp_path, "long.txt", text.encode(), max_line_bytes=10_000)
    assert report.fatal is None and "".join(row["text"] for row in rows) == text
    assert len(rows) == 4 and all(len(row["text"]) <= 10_000 and row["text"].endswith("\n") for row in rows)


@pytest.mark.parametrize(
    "name", ["../../etc/cron.d/evil.txt", "docs/../../evil.txt", "/etc/passwd.txt", "C:\\Windows\\evil.txt",
             "..\\evil.txt"],
)  # fmt: skip
def test_a_zip_with_a_name_that_leaves_its_folder_is_refused(tmp_path, name):
    report, rows = parse(tmp_path, "docs.zip", zip_of({"fine.txt": b"fine", name: b"text"}))
    assert name in report.fatal and "outside the folder" in report.fatal
    assert rows == [] and not (tmp_path.parent / "evil.txt").exists()


def test_a_zip_bomb_is_refused_by_its_compression_ratio_in_bounded_memory(tmp_path):
    content = zip_of({"bomb.txt": b"a" * (64 << 20)})
    assert len(content) < 200_000
    tracemalloc.start()
    report, rows = parse(tmp_path, "small.zip", content)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "bomb.txt" in report.fatal and "zip bomb" in report.fatal and rows == []
    assert peak < 40 << 20, f"peak {peak >> 20} MiB"


def test_a_zip_that_inflates_past_the_limit_is_refused_naming_the_member(tmp_path):
    text = "".join(f"sentence {n} of many. " for n in range(20_000)).encode()  # ~450 KB, compresses ~5x
    report, _ = parse(tmp_path, "many.zip", zip_of({"a.txt": text, "b.txt": text}), max_decoded_bytes=600_000)
    assert "more than 600,000 bytes" in report.fatal and "b.txt" in report.fatal


def test_a_member_whose_headers_understate_its_size_is_refused(tmp_path):
    content = bytearray(zip_of({"liar.txt": b"x" * 5000}, method=zipfile.ZIP_STORED))
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, index entry
        at = content.index(signature)
        struct.pack_into("<L", content, at + size_at, 10)  # "10 bytes"
    report, rows = parse(tmp_path, "liar.zip", bytes(content))
    assert "liar.txt" in report.fatal and rows == []


def test_a_zip_holding_a_binary_member_is_refused_with_the_member_and_offset(tmp_path):
    report, _ = parse(tmp_path, "docs.zip", zip_of({"a.txt": b"fine", "data/model.txt": b"header" + b"\x00" * 10}))
    assert report.fatal.startswith("data/model.txt is binary") and "offset 6" in report.fatal


def test_a_member_that_is_not_utf8_is_refused_with_its_offset(tmp_path):
    report, _ = parse(tmp_path, "docs.zip", zip_of({"latin.txt": "caf\u00e9".encode("latin-1")}))
    assert "latin.txt is not UTF-8" in report.fatal and "0xE9 at offset 3" in report.fatal


def test_a_zip_inside_the_zip_is_refused(tmp_path):
    report, _ = parse(tmp_path, "outer.zip", zip_of({"inner.zip": zip_of({"a.txt": b"a"})}))
    assert "inner.zip is a zip inside the zip" in report.fatal


def test_a_zip_with_too_many_entries_is_refused_before_its_index_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_MEMBERS", 3)
    report, _ = parse(tmp_path, "many.zip", zip_of({f"{n}.txt": b"x" for n in range(5)}))
    assert "5 entries" in report.fatal and "at most 3" in report.fatal


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip at all", "not a zip archive"),
        (zip_of({"docs/": b""}), "holds no .txt or .md documents"),
    ],
)
def test_a_zip_without_documents_is_refused(tmp_path, content, message):
    report, _ = parse(tmp_path, "docs.zip", content)
    assert message in report.fatal


def test_a_zip_is_read_on_the_queue_when_it_inflates_large(tmp_path):
    path = tmp_path / "big.zip"
    path.write_bytes(zip_of({"a.txt": b"a" * 10_000_000}))
    assert path.stat().st_size < 100_000 and unpacked_size(path, "big.zip") == 10_000_000


def upload(client, name: str, content: bytes, task: str = "domain"):
    return client.post("/datasets/upload/", {"file": SimpleUploadedFile(name, content), "task": task})


@pytest.mark.django_db
def test_a_zip_of_documents_uploads_as_a_ready_domain_dataset(owner_client, media_root):
    reply = upload(owner_client, "manual.zip", zip_of({"a.md": b"# A\nalpha", "b.txt": b"beta"}))
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and (dataset.status, dataset.format, dataset.rows_ok) == ("ready", "zip", 2)
    assert "beta" in owner_client.get(reply.url).content.decode()


@pytest.mark.django_db
def test_a_zip_that_escapes_is_refused_on_the_form_and_nothing_is_kept(owner_client, media_root, tmp_path):
    reply = upload(owner_client, "evil.zip", zip_of({"../../../escape.txt": b"text"}))
    assert reply.status_code == 400 and "outside the folder" in reply.content.decode()
    assert not Dataset.objects.exists() and not [path for path in media_root.rglob("*") if path.is_file()]
    assert not list(media_root.parent.rglob("escape*")) and not list(tmp_path.rglob("escape*"))


@pytest.mark.django_db
def test_documents_for_another_task_are_refused_on_the_form(owner_client, media_root):
    reply = upload(owner_client, "notes.md", b"# Notes", task="sft")
    assert reply.status_code == 400 and "domain adaptation only" in reply.content.decode()
