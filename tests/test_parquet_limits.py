"""Parquet that unpacks far beyond its size (a decompression bomb) is bounded like JSON Lines: a
cell over the line limit is a row error with its row and column, a column compressed like a
bomb is refused before it is decoded, the decoded text has a limit of its own, and reading it
holds a few MB at a time. A small file that unpacks large is read on the queue, not in the request."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset
from webapp.datasets.parsing import MAX_LINE_BYTES, parse_dataset


def repeated(value: str, rows: int) -> pa.DictionaryArray:
    """One value in every row, held once: how a writer dictionary-encodes it."""
    return pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([value]))


def write_parquet(path, instruction, rows: int, **options):
    responses = pa.array([f"answer {number % 100}" for number in range(rows)])
    table = pa.table({"instruction": instruction, "response": responses})
    pq.write_table(table, path, compression="zstd", compression_level=19, **options)
    return path


def upload(client, path):
    return client.post("/datasets/upload/", {"file": SimpleUploadedFile(path.name, path.read_bytes()), "task": "sft"})


def peak_memory_of_parse(path) -> dict:
    """Parse in a fresh process: how much its peak resident memory grew while reading. VmHWM, not
    ru_maxrss: Linux keeps ru_maxrss across exec, so it would start at the test run's own peak."""
    script = f"""
import json, re
import numpy, pyarrow.compute, pyarrow.parquet
from webapp.datasets.parsing import parse_dataset
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = peak()
report = parse_dataset({str(path)!r}, "d.parquet")
print(json.dumps({{"grown_mib": (peak() - before) / 1024, "rows_ok": report.rows_ok, "fatal": report.fatal}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_a_value_over_the_line_limit_is_a_row_error_with_its_row_and_column(tmp_path):
    values = ["short"] * 3 + ["x" * (2 * MAX_LINE_BYTES)] + ["short too"] * 2
    path = write_parquet(tmp_path / "d.parquet", pa.array(values), 6)
    report = parse_dataset(path, "d.parquet", out_path=tmp_path / "rows.jsonl")
    assert (report.rows_total, report.rows_ok, report.fatal) == (6, 5, None)
    [error] = report.errors
    assert (error.line, error.column) == (4, "instruction")
    assert error.problem == "the value is 2,097,152 bytes, longer than the limit of 1,048,576 bytes"
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 5


def test_a_repeated_value_over_the_line_limit_is_refused_row_by_row_without_unpacking_each(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", repeated("x" * (3 * MAX_LINE_BYTES), 2000), 2000)
    assert path.stat().st_size < 20_000
    report = parse_dataset(path, "d.parquet")
    assert report.fatal is not None and report.rows_ok == 0
    assert report.error_counts == {"instruction: value too long": 1000}  # then it gives up
    assert "the value is 3,145,728 bytes" in report.fatal


def test_a_large_value_repeated_by_a_writer_that_keeps_no_arrow_schema_is_not_unpacked_per_row(tmp_path):
    # Plain strings in the file's schema (as most writers leave it), dictionary-encoded on disk:
    # read plain, each row would get its own 4.5 MB copy (2 GB for a batch).
    value = os.urandom(2_250_000).hex()
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": [value] * 256, "response": ["ok"] * 256}), path,
                   dictionary_pagesize_limit=64 << 20)
    assert path.stat().st_size < 5 << 20
    measured = peak_memory_of_parse(path)
    assert measured["rows_ok"] == 0  # every row: value too long
    assert measured["grown_mib"] < 200, measured


def test_a_column_compressed_like_a_bomb_is_refused_unread_and_says_where(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", repeated("x" * (20 << 20), 50), 50)
    assert path.stat().st_size < 5_000
    report = parse_dataset(path, "d.parquet")
    assert report.fatal.startswith("Rows 1-50, column 'instruction': ")
    assert "unpack to 20,971,5" in report.fatal and "refused unread" in report.fatal
    assert peak_memory_of_parse(path)["grown_mib"] < 30


def test_values_just_under_the_limit_are_read_holding_a_few_mb_at_a_time(tmp_path):
    # 400 MB of text from a file of about a KB; read in batches of 1,024 rows, it held 800 MB.
    path = write_parquet(tmp_path / "d.parquet", repeated("y" * 1_000_000, 400), 400)
    assert path.stat().st_size < 5_000
    result = peak_memory_of_parse(path)
    assert result["rows_ok"] == 400 and result["fatal"] is None
    assert result["grown_mib"] < 100, result


def test_the_decoded_text_has_a_limit_of_its_own_and_nothing_is_kept_past_it(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", repeated("z" * 900, 300_000), 300_000)
    assert path.stat().st_size < 100_000
    report = parse_dataset(path, "d.parquet", out_path=tmp_path / "rows.jsonl", max_decoded_bytes=50_000_000)
    assert report.fatal.startswith("By row 5")
    assert "unpacks to more than 50,000,000 bytes of text, the limit for one dataset" in report.fatal
    assert not list(tmp_path.glob("rows.jsonl*"))


def test_a_row_group_over_the_decoded_limit_is_refused_from_its_footer(tmp_path):
    def rows(count: int) -> pa.Table:
        texts = [f"text {number} " * 100 for number in range(count)]
        return pa.table({"instruction": texts, "response": [f"answer {number}" for number in range(count)]})

    with pq.ParquetWriter(tmp_path / "d.parquet", rows(1).schema, use_dictionary=False) as writer:
        writer.write_table(rows(10))
        writer.write_table(rows(2000))
    report = parse_dataset(tmp_path / "d.parquet", "d.parquet", max_decoded_bytes=1_500_000)
    assert report.fatal.startswith("Rows 11-2,010 alone unpacks to more than 1,500,000 bytes of text")
    assert report.rows_total == 10


@pytest.mark.django_db
def test_an_upload_with_a_bomb_column_is_kept_rejected_with_the_message(owner_client, media_root, settings):
    settings.INLINE_PARSE_BYTES = 100 << 20  # read in the request: it unpacks to 20 MB
    reply = upload(owner_client, write_parquet(media_root.parent / "bomb.parquet", repeated("x" * (20 << 20), 50), 50))
    dataset = Dataset.objects.get()
    assert reply.status_code == 302 and dataset.status == "rejected"
    assert "column &#x27;instruction&#x27;" in owner_client.get(reply.url).content.decode()


@pytest.mark.django_db
def test_a_small_parquet_file_that_unpacks_large_is_read_on_the_queue(
    owner_client, media_root, settings, django_capture_on_commit_callbacks
):
    settings.INLINE_PARSE_BYTES = 100_000
    path = write_parquet(
        media_root.parent / "d.parquet",
        pa.array([f"q{n} " + "a" * 1000 for n in range(500)]),
        500,
        use_dictionary=False,
    )
    assert path.stat().st_size < 20_000  # small on disk, 500 KB unpacked
    with django_capture_on_commit_callbacks() as queued:
        upload(owner_client, path)
    assert Dataset.objects.get().status == "uploaded" and len(queued) == 1
