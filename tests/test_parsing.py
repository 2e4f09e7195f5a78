"""The dataset parser: every format, chat format, row error and whole-file problem it reports."""

import csv
import io
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.datasets.parsing import TASK_FIELDS, parse_dataset, propose_mapping, sniff_format
from worker.families import FAMILIES

ROW = {"instruction": "Say hi", "response": "Hi!"}
MESSAGES = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]


def _parse(tmp_path: Path, name: str, content: bytes | str, **options):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return parse_dataset(path, name, **options)


def _jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


FORMAT_CASES = {
    "jsonl": ("data.jsonl", _jsonl(ROW), "jsonl", None, {"instruction": "instruction", "response": "response"}),
    "jsonl with synonyms": (
        "data.jsonl",
        _jsonl({"prompt": "Say hi", "completion": "Hi!", "id": 7}),
        "jsonl",
        None,
        {"instruction": "prompt", "response": "completion"},
    ),
    "csv with capitalised synonyms": (
        "data.csv",
        "Question,Answer\nSay hi,Hi!\n",
        "csv",
        None,
        {"instruction": "Question", "response": "Answer"},
    ),
    "tsv": (
        "data.tsv",
        "instruction\tresponse\nSay hi\tHi!\n",
        "tsv",
        None,
        {"instruction": "instruction", "response": "response"},
    ),
    "json array": (
        "data.json",
        json.dumps([ROW], indent=2),
        "json",
        None,
        {"instruction": "instruction", "response": "response"},
    ),
    "jsonl named .json": (
        "data.json",
        _jsonl(ROW),
        "jsonl",
        None,
        {"instruction": "instruction", "response": "response"},
    ),
    "parquet": (
        "data.parquet",
        _parquet_bytes([{"query": "Say hi", "answer": "Hi!"}]),
        "parquet",
        None,
        {"instruction": "query", "response": "answer"},
    ),
    "csv with BOM": (
        "data.csv",
        "\ufeffinstruction,response\nSay hi,Hi!\n",
        "csv",
        None,
        {"instruction": "instruction", "response": "response"},
    ),
    "jsonl with BOM": (
        "data.jsonl",
        "\ufeff" + _jsonl(ROW),
        "jsonl",
        None,
        {"instruction": "instruction", "response": "response"},
    ),
    "openai": (
        "chat.jsonl",
        _jsonl({"messages": MESSAGES}),
        "jsonl",
        "openai",
        {},
    ),
    "sharegpt": (
        "chat.json",
        json.dumps([{"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]}]),
        "json",
        "sharegpt",
        {},
    ),
    "alpaca with empty input": (
        "alpaca.json",
        json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"}]),
        "json",
        "alpaca",
        {},
    ),
    "openai in parquet": (
        "chat.parquet",
        _parquet_bytes([{"messages": MESSAGES}]),
        "parquet",
        "openai",
        {},
    ),
}


@pytest.mark.parametrize(("name", "content", "fmt", "chat_format", "mapping"), FORMAT_CASES.values(), ids=FORMAT_CASES)
def test_it_reads_every_format_into_canonical_rows(tmp_path, name, content, fmt, chat_format, mapping):
    out = tmp_path / "rows.jsonl"
    report = _parse(tmp_path, name, content, out_path=out)
    assert report.fatal is None, report.fatal
    assert (report.format, report.chat_format, report.mapping) == (fmt, chat_format, mapping)
    assert report.errors == []
    assert report.preview == [ROW]
    assert report.usable
    assert [json.loads(line) for line in out.read_text().splitlines()] == [ROW]


CHAT_CASES = {
    "openai with system": (
        {"messages": [{"role": "system", "content": "Be brief."}, *MESSAGES]},
        {"system": "Be brief.", **ROW},
    ),
    "sharegpt with system": (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Say hi"},
                {"from": "gpt", "value": "Hi!"},
            ]
        },
        {"system": "Be brief.", **ROW},
    ),
    "alpaca with input": (
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Translate\n\nchat", "response": "cat"},
    ),
}


@pytest.mark.parametrize(("record", "row"), CHAT_CASES.values(), ids=CHAT_CASES)
def test_it_turns_chat_formats_into_instruction_and_response(tmp_path, record, row):
    report = _parse(tmp_path, "chat.jsonl", _jsonl(record))
    assert report.preview == [row]


MAPPING_CASES = {
    "exact names win": (
        ["response", "answer", "instruction"],
        "sft",
        {"instruction": "instruction", "response": "response"},
    ),
    "input becomes the instruction when nothing better": (
        ["input", "output"],
        "sft",
        {"instruction": "input", "response": "output"},
    ),
    "input stays input beside an instruction": (
        ["Instruction", "Input", "Output", "System"],
        "sft",
        {"instruction": "Instruction", "response": "Output", "system": "System", "input": "Input"},
    ),
    "classify": (["sentence", "category"], "classify", {"text": "sentence", "label": "category"}),
    "pair": (
        ["premise", "hypothesis", "label"],
        "pair",
        {"text_a": "premise", "text_b": "hypothesis", "label": "label"},
    ),
    "rerank": (
        ["question", "passage", "score"],
        "rerank",
        {"query": "question", "document": "passage", "relevance": "score"},
    ),
    "embed": (
        ["anchor", "positive", "negative"],
        "embed",
        {"query": "anchor", "positive": "positive", "negative": "negative"},
    ),
    "dpo": (["prompt", "chosen", "rejected"], "dpo", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
    "nothing matches": (["a", "b"], "sft", {}),
}


@pytest.mark.parametrize(("columns", "task", "mapping"), MAPPING_CASES.values(), ids=MAPPING_CASES)
def test_it_proposes_a_mapping(columns, task, mapping):
    assert propose_mapping(columns, task) == mapping


def test_every_task_has_required_and_optional_fields():
    assert set(TASK_FIELDS) == set(FAMILIES) and {"sft", "classify", "pair", "rerank", "embed", "dpo"} <= set(FAMILIES)
    assert all(spec["required"] and "optional" in spec for spec in TASK_FIELDS.values())


def test_it_writes_numeric_fields_as_numbers(tmp_path):
    report = _parse(tmp_path, "r.csv", "query,document,relevance\nq,d,0.5\nq,d,high\n", task="rerank")
    assert report.preview == [{"query": "q", "document": "d", "relevance": 0.5}]
    assert [(e.line, e.column, e.kind) for e in report.errors] == [(3, "relevance", "relevance: not a number")]


ROW_ERROR_CASES = {
    "jsonl: missing, null, empty, whitespace, list": (
        "d.jsonl",
        _jsonl(ROW, {"instruction": "x"}, {"instruction": "x", "response": None})
        + '{"instruction": "", "response": "y"}\n\n{"instruction": " \\t", "response": "y"}\n'
        + _jsonl({"instruction": "x", "response": ["y"]}),
        [
            (2, "response", "response: missing", "the field is missing"),
            (3, "response", "response: missing", "the value is null"),
            (4, "instruction", "instruction: empty", "the value is empty"),
            (6, "instruction", "instruction: empty", "the value is only whitespace"),
            (7, "response", "response: not text", "expected text, got a list"),
        ],
    ),
    "jsonl: bad JSON names the column, non-objects": (
        "d.jsonl",
        _jsonl(ROW) + '{"instruction": "a" "response": "b"}\n[1, 2]\n',
        [
            (2, None, "invalid JSON", "not valid JSON at column 21: Expecting ',' delimiter"),
            (3, None, "not an object", "expected an object with named fields, got a list"),
        ],
    ),
    "jsonl: deeply nested JSON": (
        "d.jsonl",
        _jsonl(ROW) + '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        [(2, None, "nested too deeply", "the JSON is nested too deeply to read")],
    ),
    "jsonl: half a surrogate pair": (
        "d.jsonl",
        _jsonl(ROW) + '{"instruction": "a\\ud800", "response": "b"}\n',
        [(2, "instruction", "instruction: invalid character", "contains half of a surrogate pair (\\ud800-\\udfff)")],
    ),
    "csv: records spanning lines start where they start": (
        "d.csv",
        'instruction,response\n"two\nlines",ok\nx,\n\ny,z,extra\n',
        [
            (4, "response", "response: empty", "the value is empty"),
            (6, None, "wrong number of fields", "has 3 fields but the header has 2"),
        ],
    ),
    "json array: element lines and absolute error positions": (
        "d.json",
        '[\n  {"instruction": "a", "response": "b"},\n  {"instruction": "a"},\n  {"instruction": "a",\n   "response" "b"},\n  7\n]',
        [
            (3, "response", "response: missing", "the field is missing"),
            (4, None, "invalid JSON", "not valid JSON at line 5, column 15: Expecting ':' delimiter"),
            (6, None, "not an object", "expected an object with named fields, got a number"),
        ],
    ),
    "json array: deeply nested element": (
        "d.json",
        '[{"instruction": "a", "response": "b"},\n' + "[" * 100_000 + "]" * 100_000 + "]",
        [(2, None, "nested too deeply", "the JSON is nested too deeply to read")],
    ),
    "openai: unfinished and malformed conversations": (
        "chat.jsonl",
        _jsonl(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            {"messages": "hello"},
            {"messages": [{"role": "robot", "content": "a"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
        ),
        [
            (2, "messages", "messages: no assistant reply", "does not end with an assistant reply"),
            (3, "messages", "messages: tool result without a call", "message 2 is a tool result with no tool call"),
            (4, "messages", "messages: not a conversation", "expected a list of messages, got text"),
            (5, "messages", "messages: unknown role", "message 1 has role 'robot'"),
            (6, "messages", "messages: misplaced system message", "message 2 is a system message"),
        ],
    ),
    "parquet: row numbers, numbers become text": (
        "d.parquet",
        _parquet_bytes([{"instruction": "a", "response": 1}, {"instruction": None, "response": 2}]),
        [(2, "instruction", "instruction: missing", "the value is null")],
    ),
}


@pytest.mark.parametrize(("name", "content", "expected"), ROW_ERROR_CASES.values(), ids=ROW_ERROR_CASES)
def test_it_names_the_line_column_and_problem_of_bad_rows(tmp_path, name, content, expected):
    report = _parse(tmp_path, name, content)
    assert report.fatal is None, report.fatal
    assert report.rows_ok == 1
    assert report.rows_total == 1 + len(expected)
    found = [(e.line, e.column, e.kind) for e in report.errors]
    assert found == [(line, column, kind) for line, column, kind, _ in expected]
    for error, (*_, problem) in zip(report.errors, expected, strict=True):
        assert error.problem.startswith(problem), error.problem


FATAL_CASES = {
    "empty file": ("d.jsonl", b"", "The file is empty."),
    "only whitespace and a BOM": ("d.csv", b"\xef\xbb\xbf \n\n", "The file is empty."),
    "header-only csv": ("d.csv", b"instruction,response\n", "The file has a header row but no data rows."),
    "not utf-8 in jsonl": (
        "d.jsonl",
        b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n',
        "byte 0xE9 at offset 58 (line 2)",
    ),
    "not utf-8 in csv after a BOM": (
        "d.csv",
        b"\xef\xbb\xbfinstruction,response\ncaf\xe9,b\n",
        "byte 0xE9 at offset 27 (line 2)",
    ),
    "not utf-8 in a json array": (
        "d.json",
        b'[\n{"instruction": "a", "response": "b"},\n{"instruction": "caf\xe9"}]',
        "byte 0xE9 at offset 61 (line 3)",
    ),
    "semicolons in a .csv": ("d.csv", b"instruction;response\na;b\n", "separated by semicolons, not commas"),
    "tabs in a .csv": ("d.csv", b"instruction\tresponse\na\tb\n", "rename it to .tsv"),
    "commas in a .tsv": ("d.tsv", b"instruction,response\na,b\n", "rename it to .csv"),
    "fake parquet": ("d.parquet", b"instruction,response\na,b\n", "is not a Parquet file"),
    "truncated parquet": ("d.parquet", _parquet_bytes([ROW])[:-10], "cut short"),
    "parquet named csv": ("d.csv", _parquet_bytes([ROW]), "Rename it to .parquet"),
    "binary garbage": ("d.csv", bytes(range(256)) * 8, "The file is binary"),
    "utf-16": ("d.csv", "instruction,response\n".encode("utf-16"), "UTF-16"),
    "spreadsheet": ("d.csv", b"PK\x03\x04" + bytes(100), "zip archive"),
    "jsonl named csv": ("d.csv", _jsonl(ROW).encode(), "holds JSON Lines. Rename it to .jsonl"),
    "single json object": ("d.json", b'{\n  "data": [\n    {"instruction": "a"}\n  ]\n}\n', "single JSON object"),
    "unknown extension": ("d.xml", b"<rows/>", "Unsupported file type .xml"),
    "unclosed json array": ("d.json", b'[{"instruction": "a", "response": "b"},\n{"instruction": "a"', "cut short"),
    "missing column, closest suggested": (
        "d.jsonl",
        _jsonl({"instruction": "a", "respnse": "b"}).encode(),
        "Missing the required column for 'response'. Columns found: 'instruction', 'respnse'. Did you mean 'respnse'?",
    ),
    "no readable rows": ("d.jsonl", b"{oops\n{oops\n", "Line 1: not valid JSON at column 2"),
    "unclosed csv quote": ("d.csv", b'instruction,response\n"a,b\n' + (b"x" * 1023 + b"\n") * 9000, "never closed"),
}


@pytest.mark.parametrize(("name", "content", "message"), FATAL_CASES.values(), ids=FATAL_CASES)
def test_it_reports_whole_file_problems_as_fatal(tmp_path, name, content, message):
    report = _parse(tmp_path, name, content, out_path=tmp_path / "rows.jsonl")
    assert report.fatal is not None and message in report.fatal, report.fatal
    assert not report.usable
    assert not (tmp_path / "rows.jsonl").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / name], "no partial output is left behind"


MAPPING_FATAL_CASES = {
    "a column mapped twice": ({"instruction": "q", "response": "q"}, "mapped to both instruction and response"),
    "a column not in the file": ({"instruction": "q", "response": "anwser"}, "Did you mean 'answer'?"),
    "a required field left out": ({"instruction": "q"}, "Missing the required column for 'response'"),
    "a field the task lacks": ({"instruction": "q", "response": "answer", "label": "x"}, "not a field of the sft task"),
}


@pytest.mark.parametrize(("mapping", "message"), MAPPING_FATAL_CASES.values(), ids=MAPPING_FATAL_CASES)
def test_it_refuses_an_impossible_mapping(tmp_path, mapping, message):
    report = _parse(tmp_path, "d.csv", "q,answer\na,b\n", mapping=mapping)
    assert message in report.fatal


def test_a_given_mapping_overrides_chat_detection(tmp_path):
    record = {"instruction": "Translate", "input": "chat", "output": "cat"}
    mapping = {"instruction": "instruction", "input": "input", "response": "output"}
    report = _parse(tmp_path, "a.jsonl", _jsonl(record), mapping=mapping)
    assert (report.chat_format, report.preview) == (
        None,
        [{"instruction": "Translate", "input": "chat", "response": "cat"}],
    )


def test_it_gives_up_when_the_first_rows_are_all_bad(tmp_path):
    report = _parse(tmp_path, "d.jsonl", _jsonl(*[{"instruction": "a", "response": ""}] * 50), give_up_after=20)
    assert report.rows_total == 20
    assert report.fatal.startswith("The first 20 rows were all rejected")
    assert "response: empty (20 rows), e.g. line 1, column 'response': the value is empty" in report.fatal


def test_a_file_whose_only_row_is_unreadable_says_so_in_the_singular(tmp_path):
    assert _parse(tmp_path, "d.jsonl", '{"instruction": "a", \n').fatal.startswith("The first row could not be read.")
    two = _parse(tmp_path, "e.jsonl", '{"a": 1,}\n{"b": \n').fatal
    assert two.startswith("None of the first 2 rows could be read.")


def test_it_keeps_a_few_examples_per_kind_but_counts_them_all(tmp_path):
    report = _parse(tmp_path, "d.jsonl", _jsonl(ROW, *[{"instruction": "a"}] * 20, *[{"response": "a"}] * 3))
    assert report.error_counts == {"response: missing": 20, "instruction: missing": 3}
    assert [e.line for e in report.errors] == [2, 3, 4, 5, 6, 22, 23, 24]
    assert report.usable


def test_it_keeps_spreadsheet_formulas_verbatim(tmp_path):
    formulas = ["=cmd|' /C calc'!A0", "+SUM(1,2)", "@A1", "-2+3"]
    content = io.StringIO()
    csv.writer(content).writerows([["instruction", "response"], *[[formula, formula] for formula in formulas]])
    report = _parse(tmp_path, "d.csv", content.getvalue(), out_path=tmp_path / "rows.jsonl")
    assert [row["instruction"] for row in report.preview] == formulas
    written = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["response"] for row in written] == formulas


def test_it_writes_only_canonical_fields(tmp_path):
    record = {"id": 1, "prompt": "Say hi", "answer": "Hi!", "system": "", "meta": {"a": 1}}
    report = _parse(tmp_path, "d.jsonl", _jsonl(record), out_path=tmp_path / "rows.jsonl")
    assert (tmp_path / "rows.jsonl").read_text() == json.dumps(ROW) + "\n"
    assert report.mapping == {"instruction": "prompt", "response": "answer", "system": "system"}


def _write_huge_line(path: Path, before: bytes, size: int, after: bytes) -> None:
    with path.open("wb") as f:
        f.write(before)
        block = b"x" * (1 << 20)
        for _ in range(size >> 20):
            f.write(block)
        f.write(after)


HUGE_CASES = {
    "jsonl line": (
        "big.jsonl",
        _jsonl(ROW).encode() + b'{"instruction": "',
        b'"}\n' + _jsonl(ROW).encode(),
        "line too long",
    ),
    "csv line": ("big.csv", b"instruction,response\nSay hi,Hi!\nSay hi,", b"\nSay hi,Hi!\n", "line too long"),
    "json array element": (
        "big.json",
        b'[{"instruction": "Say hi", "response": "Hi!"},\n{"a": "',
        b'"},\n' + json.dumps(ROW).encode() + b"]",
        "element too long",
    ),
}


@pytest.mark.parametrize(("name", "before", "after", "kind"), HUGE_CASES.values(), ids=HUGE_CASES)
def test_a_50_mb_line_is_a_row_error_read_in_bounded_memory(tmp_path, name, before, after, kind):
    path = tmp_path / name
    _write_huge_line(path, before, 50 << 20, after)
    tracemalloc.start()
    started = time.perf_counter()
    report = parse_dataset(path, name, out_path=tmp_path / "rows.jsonl")
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (report.rows_ok, report.rows_total, report.fatal) == (2, 3, None)
    assert [(e.line, e.kind) for e in report.errors] == [(2 if name != "big.csv" else 3, kind)]
    assert peak < 20 << 20, f"peak {peak >> 20} MiB"
    assert seconds < 10


def test_sniff_format_looks_at_the_content_behind_the_extension(tmp_path):
    path = tmp_path / "upload"
    path.write_text(_jsonl(ROW))
    assert sniff_format(path, "rows.JSONL") == "jsonl"
    assert sniff_format(path, "rows.txt") == "jsonl"
    path.write_text("[id],text\n1,a\n")
    assert sniff_format(path, "rows.csv") == "csv"


# Round trips ------------------------------------------------------------------------------

# No NUL: a file holding one is refused as binary. No lone surrogates: they are not text.
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40).filter(
    str.strip
)
ROWS = st.lists(
    st.fixed_dictionaries({"instruction": TEXT, "response": TEXT}, optional={"system": TEXT, "input": TEXT}),
    min_size=1,
    max_size=20,
)
ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _round_trip(name: str, content: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "rows.jsonl")
        report = _parse(Path(folder), name, content, out_path=out)
        assert report.fatal is None and report.errors == [], (report.fatal, report.errors)
        return [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]


@ROUND_TRIP
@given(rows=ROWS, ascii_only=st.booleans())
def test_valid_rows_survive_a_jsonl_round_trip(rows, ascii_only):
    content = "".join(json.dumps(row, ensure_ascii=ascii_only) + "\n" for row in rows)
    assert _round_trip("rows.jsonl", content) == rows


@ROUND_TRIP
@given(rows=ROWS)
def test_valid_rows_survive_a_csv_round_trip(rows):
    content = io.StringIO()
    writer = csv.DictWriter(content, ["instruction", "response", "system", "input"])
    writer.writeheader()
    writer.writerows(rows)
    assert _round_trip("rows.csv", content.getvalue()) == rows


@ROUND_TRIP
@given(rows=ROWS, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans(), chunk=st.integers(1, 64))
def test_valid_rows_survive_a_json_array_read_in_tiny_chunks(rows, indent, ascii_only, chunk):
    # Tiny chunks put escapes, quotes, multi-byte characters and newlines across chunk edges.
    with mock.patch("webapp.datasets.parsing._CHUNK", chunk):
        assert _round_trip("rows.json", json.dumps(rows, indent=indent, ensure_ascii=ascii_only)) == rows
