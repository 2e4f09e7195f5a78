"""Read an uploaded dataset file into canonical training rows, streaming.

`parse_dataset()` checks an upload (JSON Lines, CSV, TSV, a JSON array, Parquet, or documents:
.txt and .md files and zips of them, read by documents.py), maps its
columns onto a task's canonical fields and, when asked, writes the accepted rows as normalised
JSON Lines: one object per line holding only canonical fields. That file is what training reads.

The user gets either a usable dataset or messages that name the line, the column and the
problem. Whole-file problems go in `ParseReport.fatal`, never as a traceback. Memory use has a
fixed upper bound whatever the file size. Lines are read up to a length limit and any rest is
skipped unread. JSON arrays are scanned element by element and Parquet is read in batches.
Only a few rows are kept: the column peek, the preview and the capped error examples.

Decisions:
- Chat formats (sft only, detected when no mapping is given): OpenAI `messages`, ShareGPT
  `conversations` and Alpaca `instruction`/`input`/`output`. A conversation must be one
  exchange: an optional system message first, then one user message and one assistant reply.
  A multi-turn row is refused with a message that says so, not flattened into a transcript
  that would teach the model a made-up format.
- `line` is the 1-based physical line: where the record starts for CSV, where the element
  starts for a JSON array. For Parquet it is the 1-based row number.
- Text fields accept strings, numbers and booleans (converted to text). Values are kept
  verbatim, not stripped, so spreadsheet formulas stay as typed. A value of only whitespace
  counts as empty. An optional field that is missing, null or empty is left out of the row.
- The output goes to a side file that is moved into place only if no fatal problem occurs,
  so training never reads a half-checked dataset.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

from webapp.datasets import conversations
from webapp.datasets.conversations import RowProblem as _RowProblem
from webapp.datasets.conversations import describe as _describe
from webapp.datasets.documents import DOCUMENT_FORMATS, DocumentError, declared_size, read_documents
from worker.desirability import ACCEPTED as DESIRABILITY_WORDS
from worker.desirability import is_desirable
from worker.families import FAMILIES

TASK_FIELDS: dict[str, dict[str, list[str]]] = {
    # "numeric" fields are written as numbers (float); every other field is written as text.
    key: {"required": list(f.required), "optional": list(f.optional), **({"numeric": list(f.numeric)} if f.numeric else {})}
    for key, f in FAMILIES.items()
}
"""Each family's canonical fields (worker.families), in the shape the column mapping reads."""

# Column names (lower case) that are proposed for each field, best first. The field's own name
# comes first, so an exact match always wins.
SYNONYMS: dict[str, list[str]] = {
    "instruction": ["instruction", "prompt", "question", "query", "input"],
    "response": ["response", "output", "answer", "completion", "target"],
    "system": ["system", "system_prompt"],
    "input": ["input", "context"],
    "text": ["text", "sentence", "content", "review"],
    "label": ["label", "labels", "class", "category", "target"],
    "text_a": ["text_a", "sentence1", "premise", "question1", "text1", "anchor"],
    "text_b": ["text_b", "sentence2", "hypothesis", "question2", "text2"],
    "query": ["query", "question", "prompt", "anchor"],
    "document": ["document", "passage", "doc", "text", "context", "content"],
    "relevance": ["relevance", "score", "label", "rating"],
    "positive": ["positive", "pos", "positive_passage", "document"],
    "negative": ["negative", "neg", "hard_negative"],
    "prompt": ["prompt", "instruction", "question", "query", "input"],
    "chosen": ["chosen", "preferred", "accepted"],
    "rejected": ["rejected", "dispreferred"],
    "completion": ["completion", "response", "output", "answer"],
}

MEANING_COLUMNS = frozenset({
    "label", "labels", "kto_tag", "desirable", "is_desirable", "chosen", "rejected", "is_rejected",
    "preferred", "score", "rating", "reward", "feedback", "thumbs_up", "accepted", "good", "quality",
})
"""Column names (lower case) that say whether a row is good: instruction tuning asks before it
trains on a file with one of them that it does not read."""
COLUMN_CHOICES = ("desirable", "ignore")

MAX_LINE_BYTES = 1 << 20
"""A longer line (or JSON array element) is a row error and is skipped without being read whole."""
CSV_FIELD_LIMIT = 8 << 20
"""A CSV field this long almost always means a quote that is never closed."""
GIVE_UP_AFTER = 1000
"""Stop with a fatal error when this many rows have been read and none was accepted."""
PEEK_ROWS = 100
"""Rows read ahead to learn the columns of a source without a header (JSON)."""
PREVIEW_ROWS = 5

MAX_DECODED_BYTES = 4 << 30
"""The most text one Parquet file may unpack to; other formats are bounded by the upload limit."""

_CHUNK = 64 << 10
_PARQUET_BATCH_ROWS = 1024
_PARQUET_BATCH_BYTES = 8 << 20
"""About how much decoded data Arrow holds at a time, judged from a row group's footer."""
_PARQUET_SLICE_BYTES = 8 << 20
"""About how much decoded text is made into Python rows at a time."""
_PARQUET_DICTIONARY_BYTES = 4 << 20
"""A text column of a row group up to this size (uncompressed) is read as an Arrow dictionary, and
so is one whose dictionary page alone unpacks to about as much: read plain, each of its rows would
hold its own copy of a value that may be megabytes long (a 5 MB file unpacked to 5 GB)."""
_PARQUET_BOMB_BYTES = 8 << 20
_MOST_COMPRESSION = 100
"""Text compresses perhaps tenfold; a column over _PARQUET_BOMB_BYTES that unpacks to more than
this many times its size holds huge repeated values and is refused before it is decoded."""
_BOM = codecs.BOM_UTF8
_PARQUET_MAGIC = b"PAR1"
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".md": "text",
    ".zip": "zip",
}
_ARCHIVES = {b"PK\x03\x04": "a zip archive (an .xlsx spreadsheet?)", b"\x1f\x8b": "gzip-compressed"}
_DELIMITERS = {",": "commas", "\t": "tabs", ";": "semicolons", "|": "pipes"}
# The csv module's default limit (128 KiB) rejects long but legitimate answers; the limit is
# global to the process, so it is set once here rather than per parse.
csv.field_size_limit(CSV_FIELD_LIMIT)


@dataclass
class RowError:
    line: int
    column: str | None
    problem: str
    kind: str = ""
    """The key this error is counted under in ParseReport.error_counts."""

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", column '{self.column}'" if self.column else "")
        return f"{where}: {self.problem}"


@dataclass
class ParseReport:
    format: str = ""
    chat_format: str | None = None
    columns: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)
    """Canonical field -> source column. Empty for chat formats, whose mapping is implicit."""
    meaning_columns: list[str] = field(default_factory=list)
    """Columns that judge each row (MEANING_COLUMNS) and that the task does not read."""
    rows_total: int = 0
    rows_ok: int = 0
    errors: list[RowError] = field(default_factory=list)
    error_counts: dict[str, int] = field(default_factory=dict)
    preview: list[dict] = field(default_factory=list)
    fatal: str | None = None
    media_dropped: dict[str, int] = field(default_factory=dict)
    """With drop_media: {"items": images, audio and video left out, "rows": of how many rows}."""

    @property
    def usable(self) -> bool:
        return self.fatal is None and self.rows_ok > 0


class DatasetError(ValueError):
    """A problem with the whole file; the message is shown to the user as is."""


def parse_dataset(
    path: str | os.PathLike,
    filename: str,
    task: str = "sft",
    mapping: dict[str, str] | None = None,
    out_path: str | os.PathLike | None = None,
    max_errors_per_kind: int = 5,
    max_line_bytes: int = MAX_LINE_BYTES,
    give_up_after: int = GIVE_UP_AFTER,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    column_choices: dict[str, str] | None = None,
    drop_media: bool = False,
) -> ParseReport:
    """Check the file at `path` (uploaded as `filename`) for `task`; write accepted rows to
    `out_path` as canonical JSON Lines. `mapping` (canonical field -> column) overrides both
    the proposed mapping and chat-format detection. `column_choices` says, per column that
    judges its rows, what instruction tuning does with it ("desirable": train on the rows it
    marks desirable only; "ignore"). `drop_media`: conversations' images, audio and video are
    left out and counted (report.media_dropped) instead of refusing their rows."""
    if task not in TASK_FIELDS:
        raise ValueError(f"unknown task {task!r}")
    report = ParseReport()
    try:
        report.format = sniff_format(path, filename)
        with _open_source(report.format, path, max_line_bytes, max_decoded_bytes) as source:
            report.columns = source.columns
            convert, needed = _choose_converter(report, task, mapping, column_choices)
            with _partial_output(out_path) as write, _media_choice(drop_media, report) as convert_with:
                _convert_rows(source.records(needed), convert_with(convert), report, write, max_errors_per_kind,
                              give_up_after)
    except DatasetError as error:
        report.fatal = str(error)
    return report


@contextmanager
def _media_choice(drop_media: bool, report: ParseReport) -> Iterator[Callable[[Callable], Callable]]:
    """Wraps the converter: as is, or dropping media and counting what it dropped from accepted rows."""
    if not drop_media:
        yield lambda convert: convert
        return
    with conversations.dropping_media() as drop:
        def counting(convert: Callable[[dict], dict]) -> Callable[[dict], dict]:
            def convert_row(record: dict) -> dict:
                before = drop.items
                try:
                    row = convert(record)
                except _RowProblem:
                    drop.items = before
                    raise
                drop.rows += drop.items > before
                return row
            return convert_row
        try:
            yield counting
        finally:
            report.media_dropped = {"items": drop.items, "rows": drop.rows} if drop.items else {}


# Format sniffing ---------------------------------------------------------------------------


def sniff_format(path: str | os.PathLike, filename: str) -> str:
    """The file's format from its extension, checked against its first bytes.

    Raises DatasetError when the content contradicts the name or cannot be a dataset.
    """
    claimed = _EXTENSIONS.get(Path(filename).suffix.lower())
    with open(path, "rb") as f:
        head = f.read(_CHUNK)
    if not head.removeprefix(_BOM).strip():
        raise DatasetError("The file is empty.")
    if claimed == "parquet" or head.startswith(_PARQUET_MAGIC):
        return _check_parquet(path, head, claimed, filename)
    if claimed == "zip":
        return "zip"  # checked member by member as it is read (documents.py)
    _refuse_binary(head)
    text = head.removeprefix(_BOM).decode("utf-8", errors="replace")
    content = _json_kind(text, whole_file=len(head) < _CHUNK)
    if claimed == "jsonl" and text.lstrip().startswith("{"):
        return "jsonl"  # trust the name; the rows will say what is wrong with them
    if claimed in ("csv", "tsv"):
        if content:
            kind, extension = ("JSON Lines", ".jsonl") if content == "jsonl" else ("a JSON array", ".json")
            raise DatasetError(
                f"{filename} is named {claimed.upper()} but holds {kind}. Rename it to {extension} and upload it again."
            )
        return claimed
    if content:
        return content
    if claimed == "text":
        return "text"  # one document; a .txt of JSON rows is read as rows, above
    if claimed is None:
        suffix = Path(filename).suffix or "(no extension)"
        raise DatasetError(f"Unsupported file type {suffix}. Upload .jsonl, .json, .csv, .tsv or .parquet, or documents as .txt, .md or .zip.")
    if text.lstrip().startswith("{"):
        raise DatasetError(
            f"{filename} holds a single JSON object, not a list of rows. Upload a JSON array "
            "of objects ([{...}, {...}]) or JSON Lines (one object per line)."
        )
    raise DatasetError(
        f"{filename} should hold a JSON array of objects or JSON Lines (one object per line), "
        f"but it starts with {text.lstrip()[:30]!r}."
    )


def _check_parquet(path: str | os.PathLike, head: bytes, claimed: str | None, filename: str) -> str:
    if claimed not in ("parquet", None):
        raise DatasetError(f"{filename} is a Parquet file. Rename it to .parquet and upload it again.")
    if not head.startswith(_PARQUET_MAGIC):
        raise DatasetError(
            f"{filename} is named .parquet but is not a Parquet file (it does not start with the "
            "PAR1 marker). Export it again as Parquet, or upload CSV or JSON Lines."
        )
    with open(path, "rb") as f:
        f.seek(-len(_PARQUET_MAGIC), os.SEEK_END)
        if f.read() != _PARQUET_MAGIC:
            raise DatasetError(f"{filename} is cut short: the end of the Parquet file is missing.")
    return "parquet"


def _refuse_binary(head: bytes) -> None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DatasetError("The file is UTF-16 text. Save it as UTF-8 and upload it again.")
    for magic, what in _ARCHIVES.items():
        if head.startswith(magic):
            raise DatasetError(f"The file is {what}, not a dataset. Export it as CSV, JSON Lines or Parquet.")
    if b"\x00" in head:
        raise DatasetError(
            "The file is binary, not text (it contains NUL bytes). Upload CSV, TSV, JSON, "
            "JSON Lines or Parquet; if it is text, save it as UTF-8."
        )


def _json_kind(text: str, whole_file: bool) -> str | None:
    """'json' for an array, 'jsonl' for one object per line, None when the text is not JSON."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        # An array of objects, or an empty one; not a CSV header like "[id],text".
        return "json" if stripped[1:].lstrip()[:1] in ("{", "]", "") else None
    if not stripped.startswith("{"):
        return None
    first_line, newline, _ = stripped.partition("\n")
    if not newline and not whole_file:
        return "jsonl"  # the first line is longer than the head: too long to tell, rows will say
    return "jsonl" if _is_json_object(first_line) else None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


# Sources: columns, then (line, record) pairs where a record is a dict or a _RowProblem -------


class _PeekedSource:
    """Records with the columns known up front: from a header, or the keys of the first rows."""

    def __init__(self, records: Iterator, columns: list[str] | None = None, empty_message: str = ""):
        self._peeked = list(islice(records, PEEK_ROWS))
        self._rest = records
        if not self._peeked:
            raise DatasetError(empty_message or "The file has no rows.")
        self.columns = columns if columns is not None else _keys_in_order(self._peeked)
        if not self.columns:
            raise DatasetError(_no_columns_message(self._peeked))

    def records(self, needed: list[str]) -> Iterator:
        return chain(self._peeked, self._rest)


def _no_columns_message(peeked: list) -> str:
    problems = [(line, record) for line, record in peeked if record.__class__ is _RowProblem]
    if not problems:
        return "The rows have no fields: every object is empty."
    line, problem = problems[0]
    unread = "The first row could not" if len(peeked) == 1 else f"None of the first {len(peeked)} rows could"
    return f"{unread} be read. Line {line}: {problem}."


def _keys_in_order(peeked: list) -> list[str]:
    seen: dict[str, None] = {}
    for _, record in peeked:
        if record.__class__ is dict:
            seen.update(dict.fromkeys(record))
    return list(seen)


@contextmanager
def _open_source(fmt: str, path: str | os.PathLike, max_line_bytes: int, max_decoded_bytes: int) -> Iterator[Any]:
    if fmt == "parquet":
        yield _ParquetSource(path, max_line_bytes, max_decoded_bytes)
        return
    if fmt in DOCUMENT_FORMATS:
        yield _PeekedSource(_document_records(fmt, path, max_line_bytes, max_decoded_bytes), columns=["text"])
        return
    with open(path, "rb") as f:
        if fmt == "jsonl":
            yield _PeekedSource(_jsonl_records(f, max_line_bytes))
        elif fmt == "json":
            yield _PeekedSource(_JsonArrayScanner(f, max_line_bytes).records())
        else:
            yield _csv_source(f, fmt, max_line_bytes)


def _document_records(fmt: str, path: str | os.PathLike, max_chars: int, max_decoded_bytes: int) -> Iterator:
    """One record {"text": ...} per document (documents.py), at the document's number."""
    try:
        for document in read_documents(fmt, path, max_chars, max_decoded_bytes):
            problem = _RowProblem(document.kind, None, document.problem) if document.problem else None
            yield document.number, problem or {"text": document.text}
    except DocumentError as error:
        raise DatasetError(str(error)) from None


def _text_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[str | None]:
    """The file's lines decoded from UTF-8; None stands for a line over the limit, which is
    skipped without ever being held whole."""
    offset = _skip_bom(f)
    readline = f.readline
    number = 0
    while raw := readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and raw[-1:] != b"\n":
            offset += len(raw) + _skip_rest_of_line(f)
            yield None
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(_not_utf8(offset + error.start, number, raw[error.start])) from None
        offset += len(raw)
        yield text


def _skip_bom(f: IO[bytes]) -> int:
    """Position the file after a UTF-8 byte order mark, if any; return the bytes skipped."""
    if f.read(len(_BOM)) == _BOM:
        return len(_BOM)
    f.seek(0)
    return 0


def _skip_rest_of_line(f: IO[bytes]) -> int:
    skipped = 0
    while chunk := f.readline(_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _not_utf8(offset: int, line: int, byte: int) -> str:
    return (
        f"The file is not UTF-8: byte 0x{byte:02X} at offset {offset} (line {line}) is not valid "
        "UTF-8. Save the file as UTF-8 and upload it again."
    )


def _jsonl_records(f: IO[bytes], max_line_bytes: int) -> Iterator:
    for line, text in enumerate(_text_lines(f, max_line_bytes), 1):
        if text is None:
            yield line, _RowProblem("line too long", None, f"the line is longer than {max_line_bytes} bytes")
        elif not text.isspace():
            # Without its line break, so that an object cut short is reported where it ends
            # (the column Python's own decoder names), not at column 1 of a line after it.
            yield line, _json_object(text.rstrip("\r\n"))


def _json_object(text: str) -> dict | _RowProblem:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return _RowProblem("invalid JSON", None, f"not valid JSON at column {error.colno}: {error.msg}")
    except RecursionError:
        return _too_deep()
    return record if record.__class__ is dict else _not_an_object(record)


def _too_deep() -> _RowProblem:
    return _RowProblem("nested too deeply", None, "the JSON is nested too deeply to read")


def _not_an_object(value: object) -> _RowProblem:
    return _RowProblem("not an object", None, f"expected an object with named fields, got {_describe(value)}")


# CSV and TSV ------------------------------------------------------------------------------


def _csv_source(f: IO[bytes], fmt: str, max_line_bytes: int) -> _PeekedSource:
    too_long: deque[int] = deque()
    delimiter = "\t" if fmt == "tsv" else ","
    rows = _csv_rows(csv.reader(_csv_lines(f, max_line_bytes, too_long), delimiter=delimiter))
    first = next((fields for _, _, fields in rows if any(fields)), None)
    if first is None:
        raise DatasetError("The file is empty.")
    header = [name.strip() for name in first]
    _check_delimiter(header, delimiter)
    return _PeekedSource(
        _csv_records(rows, header, too_long),
        columns=header,
        empty_message="The file has a header row but no data rows.",
    )


def _csv_lines(f: IO[bytes], max_line_bytes: int, too_long: deque[int]) -> Iterator[str]:
    # An over-long line is replaced by an empty one so the csv reader stays in step; the
    # record that spans it is rejected in _csv_records.
    for number, text in enumerate(_text_lines(f, max_line_bytes), 1):
        if text is None:
            too_long.append(number)
            text = "\n"
        yield text


def _csv_rows(reader: Any) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of each record."""
    last_line = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DatasetError(_csv_error(last_line + 1, error)) from None
        first_line, last_line = last_line + 1, reader.line_num
        yield first_line, last_line, fields


def _csv_error(line: int, error: csv.Error) -> str:
    if "field larger than field limit" in str(error):
        return (
            f"The record that starts at line {line} has a field longer than {CSV_FIELD_LIMIT >> 20} "
            'MiB. This usually means a quote (") that is never closed.'
        )
    return f"Line {line}: the file could not be read as CSV ({error})."


def _check_delimiter(header: list[str], delimiter: str) -> None:
    if len(header) != 1:
        return
    for other, name in _DELIMITERS.items():
        if other != delimiter and other in header[0]:
            fix = {"\t": "rename it to .tsv", ",": "rename it to .csv"}.get(other, "save it again as CSV")
            raise DatasetError(
                f"The header is a single column {header[0][:80]!r}: the file seems to be separated by "
                f"{name}, not {_DELIMITERS[delimiter]}. Please {fix} and upload it again."
            )


def _csv_records(rows: Iterator, header: list[str], too_long: deque[int]) -> Iterator:
    for first_line, last_line, fields in rows:
        while too_long and too_long[0] < first_line:
            too_long.popleft()
        if too_long and too_long[0] <= last_line:
            yield first_line, _RowProblem("line too long", None, f"line {too_long[0]} is too long to read")
        elif any(fields):  # not a blank line, nor a spreadsheet's row of empty cells
            yield first_line, _csv_record(header, fields)


def _csv_record(header: list[str], fields: list[str]) -> dict | _RowProblem:
    if len(fields) != len(header):
        return _RowProblem("wrong number of fields", None, f"has {len(fields)} fields but the header has {len(header)}")
    return dict(zip(header, fields, strict=True))


# JSON arrays ------------------------------------------------------------------------------

_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING_END = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[,\]\s]")
_NOT_SPACE = re.compile(r"\S")


class _JsonArrayScanner:
    """Yields the elements of a top-level JSON array one by one from text read in chunks.

    The scanner only follows strings and bracket depth to find where an element ends; json
    then parses that slice. So a broken element is a row error and the scan carries on, and an
    element over the size limit is skipped without being held.
    """

    def __init__(self, f: IO[bytes], max_element_chars: int):
        self._chunks = _decoded_chunks(f)
        self._max = max_element_chars
        self._buf = ""
        self._pos = 0
        self._buf_offset = 0  # position of _buf[0] in the whole text
        self._line = 1
        self._line_start = 0  # position in the whole text where the current line starts

    def records(self) -> Iterator:
        if self._next_char() != "[":
            raise DatasetError("A .json file must hold an array of objects: [{...}, {...}].")
        self._pos += 1
        while (char := self._next_char()) != "]":
            if char == "":
                raise DatasetError(f"The JSON array is never closed: the file ends at line {self._line}.")
            line = self._line
            yield line, self._read_element(line, self._column())
            self._expect_separator(line)
        self._pos += 1
        if self._next_char():
            raise DatasetError(f"Line {self._line}: unexpected text after the end of the JSON array.")

    def _expect_separator(self, element_line: int) -> None:
        char = self._next_char()
        if char == ",":
            self._pos += 1
        elif char != "]":
            found = f"found {char!r}" if char else "the file ends"
            raise DatasetError(
                f"Line {self._line}: expected ',' or ']' after the element that starts at line "
                f"{element_line}, but {found}."
            )

    def _read_element(self, line: int, column: int) -> dict | _RowProblem:
        text = self._element_text(line)
        if text is None:
            return _RowProblem("element too long", None, f"the element is longer than {self._max} characters")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            at_line = line + error.lineno - 1
            at_column = column + error.colno - 1 if error.lineno == 1 else error.colno
            return _RowProblem(
                "invalid JSON", None, f"not valid JSON at line {at_line}, column {at_column}: {error.msg}"
            )
        except RecursionError:
            return _too_deep()
        return value if value.__class__ is dict else _not_an_object(value)

    def _element_text(self, line: int) -> str | None:
        """The element starting at the current position, or None when it was too long."""
        if self._buf[self._pos] not in '{["':
            return self._scalar_text(line)
        end, too_long = self._find_container_end(line)
        text = None if too_long or end - self._pos > self._max else self._buf[self._pos : end]
        self._advance_to(end)
        return text

    def _find_container_end(self, line: int) -> tuple[int, bool]:
        depth, in_string, too_long = 0, False, False
        i = self._pos
        while True:
            match = (_STRING_END if in_string else _STRUCTURE).search(self._buf, i)
            # A backslash at the end of the text read so far escapes a character not read yet.
            if match is None or (match.group() == "\\" and match.end() == len(self._buf)):
                i = match.start() if match else len(self._buf)
                too_long = too_long or i - self._pos > self._max
                if too_long:
                    self._advance_to(i)  # forget what has been scanned: it will not be parsed
                i = self._more_text(i, line)
                continue
            i = match.end()
            char = match.group()
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = not in_string
                if not in_string and depth == 0:
                    return i, too_long
            elif char in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i, too_long

    def _scalar_text(self, line: int) -> str:
        while (match := _SCALAR_END.search(self._buf, self._pos)) is None:
            if len(self._buf) - self._pos > self._max:
                raise DatasetError(f"Line {line}: a value in the JSON array is longer than {self._max} characters.")
            if not self._refill():
                break
        end = match.start() if match else len(self._buf)
        text = self._buf[self._pos : end]
        self._advance_to(end)
        return text

    def _more_text(self, scan_index: int, line: int) -> int:
        scanned = scan_index - self._pos
        if not self._refill():
            raise DatasetError(f"The file ends inside the element that starts at line {line}: is it cut short?")
        return self._pos + scanned

    def _next_char(self) -> str:
        """The next non-space character (not consumed), or "" at the end of the file."""
        while (match := _NOT_SPACE.search(self._buf, self._pos)) is None:
            self._advance_to(len(self._buf))
            if not self._refill():
                return ""
        self._advance_to(match.start())
        return self._buf[self._pos]

    def _advance_to(self, index: int) -> None:
        newlines = self._buf.count("\n", self._pos, index)
        if newlines:
            self._line += newlines
            self._line_start = self._buf_offset + self._buf.rindex("\n", self._pos, index) + 1
        self._pos = index

    def _refill(self) -> bool:
        """Append the next chunk, dropping the text before the current position."""
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._buf_offset += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def _column(self) -> int:
        return self._buf_offset + self._pos - self._line_start + 1


def _decoded_chunks(f: IO[bytes]) -> Iterator[str]:
    """The file as UTF-8 text in chunks; a bad byte is fatal, named by offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = _skip_bom(f)
    newlines = 0
    while True:
        data = f.read(_CHUNK)
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as error:
            carried = len(error.object) - len(data)  # bytes of a character split across chunks
            line = newlines + error.object.count(b"\n", 0, error.start) + 1
            raise DatasetError(_not_utf8(offset - carried + error.start, line, error.object[error.start])) from None
        if not data:
            return
        offset += len(data)
        newlines += data.count(b"\n")
        if text:
            yield text


# Parquet ----------------------------------------------------------------------------------


class _ParquetSource:
    """Parquet rows, with what decoding costs bounded before it is spent.

    Parquet is compressed and dictionary-encoded, so a file of a few KB can unpack to GBs (one
    long value, repeated). So each row group's sizes in the footer are checked before it is
    decoded; text columns are read as Arrow dictionaries (a repeated value is held once); each
    cell's size is measured in Arrow; and only then are rows made into Python objects, a few MB
    at a time. A cell over the line limit is a row error, like an over-long JSON line, and the
    decoded text of the whole file has a limit of its own.
    """

    def __init__(self, path: str | os.PathLike, max_value_bytes: int, max_decoded_bytes: int):
        # Imported here: pyarrow is heavy, and only Parquet uploads need it.
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._read_errors = (pa.ArrowException, OSError)
        self._max_value, self._max_decoded = max_value_bytes, max_decoded_bytes
        try:
            self._file = pq.ParquetFile(path)
        except self._read_errors as error:
            raise DatasetError(f"The Parquet file could not be read: {error}") from None
        self._path, self._plain_schema = path, self._file.schema_arrow
        schema = self._file.schema
        self._text = {
            schema.column(i).path for i in range(len(schema)) if schema.column(i).physical_type == "BYTE_ARRAY"
        }
        self.columns = list(self._file.schema_arrow.names)
        if self._file.metadata.num_rows == 0:
            raise DatasetError("The file has no rows.")

    def records(self, needed: list[str]) -> Iterator:
        first_row, decoded = 1, 0
        try:
            for group in range(self._file.metadata.num_row_groups):
                metadata = self._file.metadata.row_group(group)
                batch_rows = _check_row_group(metadata, needed, first_row, self._max_decoded)
                reader = self._reader(metadata)
                for batch in reader.iter_batches(batch_size=batch_rows, row_groups=[group], columns=needed):
                    for row, record, size in self._batch_records(batch, first_row):
                        decoded += size
                        if decoded > self._max_decoded:
                            raise DatasetError(_too_much_text(f"By row {row:,} the file", self._max_decoded))
                        yield row, record
                    first_row += batch.num_rows
        except self._read_errors as error:
            raise DatasetError(f"Row {first_row}: the Parquet file could not be read: {error}") from None

    def _reader(self, group: Any) -> Any:
        """The file read with the row group's small text columns, and those with a large
        dictionary page, as Arrow dictionaries, so a repeated value is held once. Arrow grows such
        a dictionary over the whole row group, so other large columns are read plain, in batches
        sized from the footer, instead."""
        import pyarrow.parquet as pq

        chunks = [group.column(i) for i in range(group.num_columns)]
        as_dictionary = [
            chunk.path_in_schema
            for chunk in chunks
            if chunk.path_in_schema in self._text
            and (chunk.total_uncompressed_size <= _PARQUET_DICTIONARY_BYTES
                 or _dictionary_page_bytes(chunk) > _PARQUET_DICTIONARY_BYTES)
        ]
        return pq.ParquetFile(self._path, metadata=self._file.metadata, read_dictionary=as_dictionary or None)

    def _batch_records(self, batch: Any, first_row: int) -> Iterator[tuple[int, dict | _RowProblem, int]]:
        """(row, record or problem, decoded bytes) of each row of the batch."""
        import numpy as np

        sizes = np.stack([_cell_sizes(column) for column in batch.columns])  # (column, row)
        totals = sizes.sum(axis=0).tolist()
        start = 0
        for index in np.flatnonzero((sizes > self._max_value).any(axis=0)).tolist():
            yield from self._slices(batch, start, index, first_row, totals)
            column = int(np.argmax(sizes[:, index] > self._max_value))
            problem = _value_too_long(batch.schema.names[column], int(sizes[column, index]), self._max_value)
            yield first_row + index, problem, 0
            start = index + 1
        yield from self._slices(batch, start, batch.num_rows, first_row, totals)

    def _slices(self, batch: Any, start: int, stop: int, first_row: int, totals: list[int]) -> Iterator:
        """Rows start..stop of the batch as Python objects, made about _PARQUET_SLICE_BYTES at a
        time. Each slice is decoded to plain Arrow first: Python rows from a dictionary would
        convert its whole dictionary each time."""
        import pyarrow as pa

        plain = pa.schema([self._plain_schema.field(name) for name in batch.schema.names])
        while start < stop:
            end, held = start + 1, totals[start]
            while end < stop and held + totals[end] <= _PARQUET_SLICE_BYTES:
                held += totals[end]
                end += 1
            for index, record in enumerate(batch.slice(start, end - start).cast(plain).to_pylist(), start):
                yield first_row + index, record, totals[index]
            start = end


def _dictionary_page_bytes(chunk: Any) -> int:
    """About how much a column chunk's dictionary page unpacks to: the footer gives only where the
    page lies, so its share of the chunk's bytes on disk times what the chunk unpacks to."""
    if not chunk.has_dictionary_page or not chunk.total_compressed_size:
        return 0
    on_disk = chunk.data_page_offset - chunk.dictionary_page_offset
    return chunk.total_uncompressed_size * on_disk // chunk.total_compressed_size


def _check_row_group(group: Any, needed: list[str], first_row: int, max_decoded: int) -> int:
    """Refuse, from the footer alone, a row group that unpacks to more than is allowed or is
    compressed like a bomb; else how many rows to decode at a time to hold about
    _PARQUET_BATCH_BYTES (a dictionary-encoded column unpacks to more, but is read as one)."""
    where = f"Rows {first_row:,}-{first_row + group.num_rows - 1:,}"
    unpacked = 0
    for chunk in (group.column(i) for i in range(group.num_columns)):
        column = chunk.path_in_schema.split(".", 1)[0]
        if column not in needed:
            continue
        size, packed = chunk.total_uncompressed_size, max(chunk.total_compressed_size, 1)
        if size > _PARQUET_BOMB_BYTES and size > _MOST_COMPRESSION * packed:
            raise DatasetError(
                f"{where}, column '{column}': {packed:,} bytes unpack to {size:,} bytes, {size // packed:,} "
                "times as many. Real text does not compress like that, so the file is refused unread; export "
                "the data again without huge repeated values."
            )
        unpacked += size
    if unpacked > max_decoded:
        raise DatasetError(_too_much_text(f"{where} alone", max_decoded))
    return max(1, min(_PARQUET_BATCH_ROWS, _PARQUET_BATCH_BYTES * group.num_rows // max(unpacked, 1)))


def _cell_sizes(array: Any) -> Any:
    """The decoded bytes of each cell of an Arrow array (as numpy), measured without making
    Python objects: text by its length (a dictionary's values measured once), lists and
    structs by what they hold, numbers by their width."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        values = _cell_sizes(array.dictionary)
        indices = array.indices.fill_null(0).to_numpy(zero_copy_only=False)
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        return np.where(valid, values[indices] if len(values) else 0, 0)
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        held = np.concatenate([[0], np.cumsum(_cell_sizes(array.values), dtype=np.int64)])
        offsets = array.offsets.to_numpy(zero_copy_only=False)
        return held[offsets[1:]] - held[offsets[:-1]]
    if pa.types.is_struct(kind):
        return sum((_cell_sizes(field) for field in array.flatten()), np.zeros(len(array), np.int64))
    if pa.types.is_primitive(kind):
        return np.full(len(array), max(kind.bit_width // 8, 1), np.int64)
    return np.full(len(array), array.nbytes // max(len(array), 1), np.int64)


def _value_too_long(column: str, size: int, limit: int) -> _RowProblem:
    return _RowProblem(
        "value too long", column, f"the value is {size:,} bytes, longer than the limit of {limit:,} bytes"
    )


def _too_much_text(what: str, limit: int) -> str:
    return (
        f"{what} unpacks to more than {limit:,} bytes of text, the limit for one dataset. Upload "
        "fewer rows, or split the file into several datasets."
    )


def unpacked_size(path: str | os.PathLike, filename: str) -> int:
    """About how many bytes reading the file handles: a Parquet file's uncompressed size from its
    footer (a few KB can unpack to far more), a zip's from its index, any other file's own size."""
    size = os.path.getsize(path)
    kind = _EXTENSIONS.get(Path(filename).suffix.lower())
    if kind == "zip":
        return max(size, declared_size(path))
    if kind != "parquet":
        return size
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError):
        return size  # reading says what is wrong with it
    return max(size, sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)))


# Mapping ----------------------------------------------------------------------------------


KTO_LABELS = frozenset({"label", "kto_tag", "desirable", "is_desirable"})
"""Column names that say whether a reply is desirable (a file with one proposes KTO)."""
_TASK_ORDER = ("kto", "dpo", "rerank", "pair", "embed", "classify", "sft", "domain")
"""The tasks a file's columns are matched against, the most specific first."""


def peek_columns(path: str | os.PathLike, filename: str, max_decoded_bytes: int = MAX_DECODED_BYTES) -> list[str]:
    """The file's columns (a header, or the keys of its first rows); [] when it cannot be read."""
    try:
        fmt = sniff_format(path, filename)
        with _open_source(fmt, path, MAX_LINE_BYTES, max_decoded_bytes) as source:
            return list(source.columns)
    except DatasetError:
        return []


def propose_task(columns: list[str]) -> str | None:
    """The task a file's columns say it is for: a conversation format first (with a label: KTO;
    with chosen and rejected: DPO), then the first task, most specific first, whose required
    fields all find a column (propose_mapping). None when none does."""
    names = {column.strip().lower() for column in columns}
    if conversations.preference_shape(columns):
        return "dpo"
    if names & {"messages", "conversations"}:
        return "kto" if "label" in names and "kto" in TASK_FIELDS else "sft"
    for task in _TASK_ORDER:
        if task == "kto" and not names & KTO_LABELS:  # a "category" is a class, not a verdict on the reply
            continue
        if task in TASK_FIELDS and set(TASK_FIELDS[task]["required"]) <= set(propose_mapping(columns, task)):
            return task
    return None


def propose_mapping(columns: list[str], task: str) -> dict[str, str]:
    """Canonical field -> column, by exact name (ignoring case) first, then by synonym.

    Required fields are matched before optional ones, so an optional field never takes the
    only column a required field could use.
    """
    spec = TASK_FIELDS[task]
    by_name: dict[str, str] = {}
    for column in columns:
        by_name.setdefault(column.strip().lower(), column)
    mapping: dict[str, str] = {}
    for fields in (spec["required"], spec["optional"]):
        for exact in (True, False):
            for name in fields:
                names = [name] if exact else SYNONYMS.get(name, [name])
                column = _first_free(names, by_name, mapping)
                if name not in mapping and column:
                    mapping[name] = column
    return mapping


def _first_free(names: list[str], by_name: dict[str, str], mapping: dict[str, str]) -> str | None:
    taken = set(mapping.values())
    return next((by_name[name] for name in names if name in by_name and by_name[name] not in taken), None)


def _choose_converter(
    report: ParseReport, task: str, mapping: dict[str, str] | None, column_choices: dict[str, str] | None = None
) -> tuple[Callable, list[str]]:
    """The function that turns a record into a canonical row, and the columns it reads."""
    convert, needed = _converter(report, task, mapping)
    if task == "sft":
        return _guard_meaning_columns(report, convert, needed, column_choices or {})
    return convert, needed


def _converter(report: ParseReport, task: str, mapping: dict[str, str] | None) -> tuple[Callable, list[str]]:
    spec = TASK_FIELDS[task]
    chat_format = _detect_chat_format(report.columns, task) if mapping is None else None
    if chat_format:
        report.chat_format = chat_format
        return _chat_converter(chat_format, report.columns, task)
    if mapping is None:
        report.mapping = propose_mapping(report.columns, task)
    else:
        report.mapping = {name: column for name, column in mapping.items() if column}
        _check_given_mapping(report.mapping, task, report.columns)
    _check_mapping(report.mapping, spec, report.columns)
    convert = _mapped_converter(report.mapping, spec)
    if task == "dpo" and report.mapping.get("prompt") == "prompt" and conversations.preference_shape(report.columns) == "prompt":
        extra = [name for name in ("tools", *conversations.MEDIA_COLUMNS) if name in report.columns]
        return partial(_prompt_or_flat, flat=convert), list(dict.fromkeys([*report.mapping.values(), *extra]))
    return convert, list(report.mapping.values())


def _guard_meaning_columns(
    report: ParseReport, convert: Callable, needed: list[str], choices: dict[str, str]
) -> tuple[Callable, list[str]]:
    """Instruction tuning trains on every row's reply as a good answer. A column that says a row is
    good or bad (a label, a score, a rejected flag) changes that meaning, so it is never dropped
    silently: the file is refused until the user chooses, per column, to train on the desirable
    rows only ("desirable") or to ignore it ("ignore")."""
    unread = [column for column in report.columns
              if column.strip().lower() in MEANING_COLUMNS and column not in needed]
    report.meaning_columns = unread
    undecided = [column for column in unread if choices.get(column) not in COLUMN_CHOICES]
    if undecided:
        raise DatasetError(
            f"Column '{undecided[0]}' says something about each row (a label, a score or a flag) that "
            "instruction tuning would not read: every reply would be trained on as a good answer, the ones "
            f"it marks as bad too. Choose what '{undecided[0]}' means on this dataset's page: train on the "
            "rows it marks desirable only, or ignore it. Labelled replies (desirable / undesirable) can also "
            "train Preference tuning (KTO): upload the file again with that task."
        )
    judged = [column for column in unread if choices[column] == "desirable"]
    if not judged:
        return convert, needed
    return partial(_desirable_only, convert=convert, columns=judged), [*needed, *judged]


def _desirable_only(record: dict, convert: Callable, columns: list[str]) -> dict:
    for column in columns:
        value = record.get(column)
        verdict = is_desirable(("true" if value else "false") if value.__class__ is bool else str(value)) \
            if value is not None else None
        if verdict is None:
            raise _RowProblem("unreadable label", column, f"{str(value)[:40]!r} is not one of {DESIRABILITY_WORDS}, "
                              "so it is not known whether the row is desirable")
        if not verdict:
            raise _RowProblem("marked undesirable", column, "left out: the row is marked undesirable, and only "
                              "desirable rows are trained on (your choice for this column)")
    return convert(record)


def _detect_chat_format(columns: list[str], task: str) -> str | None:
    names = set(columns)
    if task == "dpo":
        return _PREFERENCE_FORMATS.get(conversations.preference_shape(columns))
    conversation = "openai" if "messages" in names else "sharegpt" if "conversations" in names else None
    if task == "kto":
        return conversation if conversation and "label" in names else None
    if task != "sft":
        return None
    if conversation:
        return conversation
    if {"instruction", "output"} <= names and "response" not in names:
        return "alpaca"
    return None


def _check_given_mapping(mapping: dict[str, str], task: str, columns: list[str]) -> None:
    spec = TASK_FIELDS[task]
    fields = spec["required"] + spec["optional"]
    for name, column in mapping.items():
        if name not in fields:
            raise DatasetError(f"'{name}' is not a field of the {task} task; its fields are {', '.join(fields)}.")
        if column not in columns:
            raise DatasetError(
                f"Column '{column}' (chosen for {name}) is not in the file. Columns found: "
                f"{_listing(columns)}.{_did_you_mean([column], columns)}"
            )
    for name, column in mapping.items():
        others = [other for other, chosen in mapping.items() if chosen == column and other != name]
        if others:
            raise DatasetError(
                f"Column '{column}' is mapped to both {name} and {others[0]}; pick one column per field."
            )


def _check_mapping(mapping: dict[str, str], spec: dict[str, list[str]], columns: list[str]) -> None:
    for column in mapping.values():
        if columns.count(column) > 1:
            raise DatasetError(f"The column name '{column}' appears more than once in the header; rename one of them.")
    unused = [column for column in columns if column not in mapping.values()]
    for name in spec["required"]:
        if name not in mapping:
            raise DatasetError(
                f"Missing the required column for '{name}'. Columns found: {_listing(columns)}."
                f"{_did_you_mean(SYNONYMS.get(name, [name]), unused)} Choose the column that holds "
                f"the {name} in the mapping."
            )


def _did_you_mean(names: list[str], candidates: list[str]) -> str:
    lowered = {candidate.lower(): candidate for candidate in candidates}
    for name in names:
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        if close:
            return f" Did you mean '{lowered[close[0]]}'?"
    return ""


def _listing(columns: list[str], shown: int = 20) -> str:
    if not columns:
        return "(none)"
    names = ", ".join(f"'{column}'" for column in columns[:shown])
    return names + (f" and {len(columns) - shown} more" if len(columns) > shown else "")


# Records -> canonical rows ----------------------------------------------------------------


def _mapped_converter(mapping: dict[str, str], spec: dict[str, list[str]]) -> Callable[[dict], dict]:
    numeric = spec.get("numeric", [])
    text_fields = [
        (name, mapping[name], name in spec["required"])
        for name in spec["required"] + spec["optional"]
        if name in mapping and name not in numeric
    ]
    number_fields = [(name, mapping[name]) for name in numeric]

    def convert(record: dict) -> dict:
        row = {}
        for name, column, required in text_fields:
            value = _text(record, column, required)
            if value is not None:
                row[name] = value
        for name, column in number_fields:
            row[name] = _number(record, column)
        return row

    return convert


def _text(record: dict, column: str, required: bool) -> str | None:
    """The column's value as text; None for an absent optional value."""
    value = record.get(column)
    if value.__class__ is str:
        if value and not value.isspace():
            return value
        if required:
            raise _RowProblem("empty", column, "the value is empty" if not value else "the value is only whitespace")
        return None
    if value is None:
        if required:
            raise _RowProblem("missing", column, "the value is null" if column in record else "the field is missing")
        return None
    if value.__class__ in (int, float):
        return str(value)
    if value.__class__ is bool:
        return "true" if value else "false"
    raise _RowProblem("not text", column, f"expected text, got {_describe(value)}")


def _number(record: dict, column: str) -> float:
    value = record.get(column)
    if value is None or value == "":
        raise _RowProblem("missing", column, "the value is missing")
    try:
        number = float(value) if value.__class__ in (int, float, str) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _RowProblem("not a number", column, f"expected a number, got {str(value)[:40]!r}")
    return number


_CONVERSATION_COLUMN = {"openai": "messages", "sharegpt": "conversations"}
_PREFERENCE_FORMATS = {
    "conversations": "sharegpt", "messages": "openai", "openai": "openai-preference", "full": "paired-messages",
}
"""A preference file's conversational shape (conversations.preference_shape) -> its chat format name.
A `prompt` column is read through the mapping, each row as messages or as flat text."""
_PREFERENCE_SHAPES = {name: shape for shape, name in _PREFERENCE_FORMATS.items()}
_PREFERENCE_COLUMNS = {
    "openai": ["input", "preferred_output", "non_preferred_output"],
    "full": ["chosen_messages", "rejected_messages", "chosen", "rejected"],
}


def _chat_converter(chat_format: str, columns: list[str], task: str) -> tuple[Callable, list[str]]:
    """A conversation format's converter and the columns it reads (the tools, a separate system
    column and any image columns beside the conversation: images are refused, not dropped)."""
    extra = [name for name in ("tools", "system", *conversations.MEDIA_COLUMNS) if name in columns]
    if task == "dpo":
        shape = _PREFERENCE_SHAPES[chat_format]
        reads = _PREFERENCE_COLUMNS.get(shape, [shape, "chosen", "rejected"])
        return partial(conversations.dpo_row, shape=shape), [name for name in dict.fromkeys(reads + extra) if name in columns]
    if chat_format == "alpaca":
        return _alpaca_row, [name for name in ("instruction", "input", "output", "system") if name in columns]
    column = _CONVERSATION_COLUMN[chat_format]
    if task == "kto":
        return partial(conversations.kto_row, column=column, label="label"), [column, "label", *extra]
    return partial(conversations.sft_row, column=column), [column, *extra]


def _prompt_or_flat(record: dict, flat: Callable[[dict], dict]) -> dict:
    """A preference row whose prompt and answers are messages (TRL's conversational shape), or text."""
    return conversations.dpo_row(record, "prompt") if conversations.is_conversational(record) else flat(record)


def _alpaca_row(record: dict) -> dict:
    instruction = _text(record, "instruction", required=True)
    extra = _text(record, "input", required=False)
    row = {
        "instruction": f"{instruction}\n\n{extra}" if extra else instruction,
        "response": _text(record, "output", required=True),
    }
    system = _text(record, "system", required=False)
    if system:
        row["system"] = system
    return row


# The row loop -----------------------------------------------------------------------------


@contextmanager
def _partial_output(out_path: str | os.PathLike | None) -> Iterator[Callable[[bytes], Any] | None]:
    """A writer to a side file that replaces out_path only if the parse ends without error."""
    if out_path is None:
        yield None
        return
    partial = f"{out_path}.partial"
    try:
        with open(partial, "wb", buffering=1 << 20) as out:
            yield out.write
    except BaseException:
        os.remove(partial)
        raise
    os.replace(partial, out_path)


def _convert_rows(
    records: Iterator,
    convert: Callable[[dict], dict],
    report: ParseReport,
    write: Callable[[bytes], Any] | None,
    max_errors_per_kind: int,
    give_up_after: int,
) -> None:
    to_json = json.JSONEncoder(ensure_ascii=False).encode
    preview = report.preview
    total = ok = 0
    try:
        for line, record in records:
            total += 1
            try:
                if record.__class__ is _RowProblem:
                    raise record  # the reader already found this row unreadable
                row = convert(record)
                data = (to_json(row) + "\n").encode("utf-8")
            except _RowProblem as problem:
                _count_error(report, line, problem, max_errors_per_kind)
                if ok == 0 and total >= give_up_after:
                    raise DatasetError(_give_up_message(report, total)) from None
                continue
            except UnicodeEncodeError:
                _count_error(report, line, _unpaired_surrogate(row, report.mapping), max_errors_per_kind)
                continue
            ok += 1
            if len(preview) < PREVIEW_ROWS:
                preview.append(row)
            if write:
                write(data)
    finally:
        report.rows_total, report.rows_ok = total, ok


def _count_error(report: ParseReport, line: int, problem: _RowProblem, cap: int) -> None:
    kind = f"{problem.column}: {problem.kind}" if problem.column else problem.kind
    count = report.error_counts.get(kind, 0) + 1
    report.error_counts[kind] = count
    if count <= cap:
        report.errors.append(RowError(line, problem.column, problem.problem, kind))


def _unpaired_surrogate(row: dict, mapping: dict[str, str]) -> _RowProblem:
    # JSON can spell half of a surrogate pair (\ud800); that is not text, and the tokenizer
    # would fail on it in the middle of training.
    name = next(name for name, value in row.items() if isinstance(value, str) and _unencodable(value))
    return _RowProblem(
        "invalid character", mapping.get(name, name), "contains half of a surrogate pair (\\ud800-\\udfff)"
    )


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _give_up_message(report: ParseReport, total: int) -> str:
    kind, count = max(report.error_counts.items(), key=lambda item: item[1])
    example = next(error for error in report.errors if error.kind == kind)
    return (
        f"The first {total} rows were all rejected, so reading stopped. Most common problem: "
        f"{kind} ({count} rows), e.g. {example}. Check the file format and the column mapping."
    )
