"""The quality report of a dataset: what the model will see, measured before anything trains.

`compute_report()` reads the canonical rows (rows.jsonl) once, in batches, and measures each row
with the base model's own fast tokenizer, the way the worker will feed it: through the chat
template for instruction and preference tuning (sft, dpo), as the text, the text pair or the
query + document for the encoder tasks. It returns a JSON-serialisable dict: a histogram of
token lengths with the cutoff (max length) and the rows past it, label balance, and the count
and a few examples of each problem (exact duplicates, rows in both training and validation,
missing optional fields, DPO pairs whose chosen equals rejected, reranker queries with no
relevant document).

Memory: the rows are never held. Each row leaves a few numbers in compact arrays (two 8-byte
digests, a length, a group number: about 25 bytes a row, 25 MB for a million rows); everything
else is bounded (one batch of rows, the tokenizer, a few examples). Duplicates and overlaps are
found by sorting digests, never by keeping strings.

Torch-free on purpose (it runs in the "cpu" worker, called by webapp/datasets/tasks.py, and in
the benchmark): it loads the tokenizer with `tokenizers` and renders the chat template with
transformers' own renderer (`render_jinja_template`), as `apply_chat_template` does. The worker's
splits are taken on row numbers here, with the same held-out counts (worker.rows) and the same
seeded shuffles, and the message layout is mirrored; tests/test_quality.py compares both with the
worker's functions so they cannot drift apart silently.

Speed: rendering the template row by row dominated the report (docs/performance.md, "Dataset
reading and quality statistics at scale"), so the template is rendered
once per message layout (which roles, which contents empty) with placeholder contents, and each
row's contents are put in between the template's pieces by string concatenation. A layout uses
this fast path only once the real renderer agrees with it on tricky probe contents and on the
layout's first CHECKED_ROWS rows; a template that transforms the contents (trims or escapes
them, leaves one out) fails that check and keeps the real renderer. Only a template that
branches on a word none of those contents hold could slip through; the catalog's chat templates
just put the contents in place.
"""

from __future__ import annotations

import json
import random
import re
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import (
    _CONTROL_TOKEN_END,
    _CONTROL_TOKEN_START,
    _get_control_token_patterns,
    _get_template_literal_text,
    encode_marked_chat,
    mark_control_tokens,
    render_jinja_template,
)

from worker.conversations import (
    CONVERSATION_FIELDS,
    for_template,
    last_reply,
    prompt_messages,
    reply_text,
    transcript,
)
from worker.families import FAMILIES, generative_keys
from worker.rows import held_count, held_groups, normalised, row_input, stratified_groups

BATCH_ROWS = 512
"""Rows tokenized per call of the tokenizer's batch encoder."""
HISTOGRAM_BINS = 40
EXAMPLES = 3
"""Examples kept of each problem."""
MAX_LABELS = 50
"""Label balance lists the most frequent labels; the rest are counted together."""
LABEL_LIMIT = 1000
"""Distinct labels (or relevance values) told apart; more are counted as one "other" (a classifier
with more labels is refused by checks/classify.py anyway)."""
SNIPPET_CHARS = 160
_MAYBE_PLACEHOLDER = re.compile(r"\{[\s{A-Za-z_]")
"""A brace a placeholder may start with (never JSON's own "{" before a quoted key): one search
of the row's JSON text rules out most rows before their texts are looked at one by one."""
_TEMPLATE_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}|(?<![\w}\\])\$?\{[A-Za-z_]\w*\}")
CHECKED_ROWS = 32
"""Rows of each message layout rendered by both the real renderer and the fast path, which is
trusted for that layout only if they all agree."""
CHAT_TASKS = generative_keys()
OPTIONAL_FIELDS = {key: f.optional for key, f in FAMILIES.items() if f.optional}
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Placeholder contents: private-use characters that neither transformers' control-token markers
# (U+F0000, U+F0001) nor a template writes.
_PLACEHOLDER = "\U000f00f0{}\U000f00f1"
_PLACEHOLDER_RE = re.compile("\U000f00f0([0-9]+)\U000f00f1")
_PROBES = (
    "  leading and trailing spaces, a newline \n",
    "quotes \" ' and a backslash \\, {{ jinja }} {% if x %}, <think>thoughts</think> after",
    "unicode: é ß 漢字 🙂 \u200b\ttab",
)
"""Contents the fast path must render exactly as the real renderer, with the template's own
special tokens typed in them too."""


# Measuring rows with the base model's tokenizer ------------------------------------------------


class TokenCounter:
    """Token lengths of rows as the worker will see them, with the base model in `model_dir`.

    A row's length is that of the longest sequence the model reads from it (for DPO the longer
    of prompt + chosen and prompt + rejected; for embeddings the longest of its texts).
    """

    def __init__(self, model_dir: str | Path, task: str, max_length: int):
        self.model_dir = Path(model_dir)
        self.task = task
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # transformers switches these off before encoding; tokenizer.json may carry them.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.cutoff = max_length if task in CHAT_TASKS else min(max_length, self._model_limit())
        if task in CHAT_TASKS:
            self.template, self.template_vars = self._chat_template()
            self.control_re, self.markers_re = self._control_patterns()
            self._layouts: dict[tuple, _Layout] = {}

    # Encoders: the text, the pair, each text of an embedding row --------------------------------
    def lengths(self, rows: list[dict]) -> tuple[list[int], list[int]]:
        """(length of each row, prompt length of each row that is longer than the cutoff or -1)."""
        if self.task == "sft":
            return self._chat_lengths(rows, [[_assistant(reply_text(last_reply(row)))] for row in rows])
        if self.task == "dpo":
            return self._chat_lengths(
                rows, [[_assistant(row["chosen"])] for row in rows], [[_assistant(row["rejected"])] for row in rows]
            )
        if self.task == "kto":
            return self._chat_lengths(rows, [[_assistant(row["completion"])] for row in rows])
        if self.task == "domain":  # raw text, no template: documents are packed, never cut whole
            return self._encode([row["text"] for row in rows], special=False), [-1] * len(rows)
        if self.task == "embed":
            columns = [[row[name] for row in rows] for name in ("query", "positive")]
            columns.append([row.get("negative", "") for row in rows])
            counts = [self._encode(texts, special=True) for texts in columns]
            lengths = [max(q, p, n if row.get("negative") else 0) for row, q, p, n in zip(rows, *counts, strict=True)]
        else:
            names = {"classify": ("text",), "pair": ("text_a", "text_b"), "rerank": ("query", "document")}[self.task]
            texts = [row[names[0]] if len(names) == 1 else (row[names[0]], row[names[1]]) for row in rows]
            lengths = self._encode(texts, special=True)
        return lengths, [-1] * len(rows)

    def _encode(self, texts: list, special: bool) -> list[int]:
        return [len(encoding) for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=special)]

    def _model_limit(self) -> int:
        """The most positions the encoder takes (the worker cuts max_seq_length to it)."""
        config = _read_json(self.model_dir / "config.json")
        limit = config.get("max_position_embeddings") or 10**9
        if self.task == "embed":  # sentence-transformers' own limit for this model
            limit = min(limit, _read_json(self.model_dir / "sentence_bert_config.json").get("max_seq_length") or limit)
        return limit

    # Chat models: the chat template, as worker.recipes.sft / dpo render it ---------------------
    def _chat_lengths(self, rows: list[dict], *replies: list[list[dict]]) -> tuple[list[int], list[int]]:
        prompts = [self.prompt_messages(row) for row in rows]
        full = [
            self._token_ids(self.render([prompt + reply[i] for i, prompt in enumerate(prompts)], False))
            for reply in replies
        ]
        lengths = [max(len(ids[i]) for ids in full) for i in range(len(rows))]
        long_rows = [i for i, length in enumerate(lengths) if length > self.cutoff]
        prompt_lengths = [-1] * len(rows)
        if long_rows:
            # Only a row longer than the cutoff can lose its whole reply: count its prompt as the
            # worker does, the common prefix of the prompt's tokens and each full conversation's.
            prompt_ids = self._token_ids(self.render([prompts[i] for i in long_rows], True))
            for i, ids in zip(long_rows, prompt_ids, strict=True):
                prompt_lengths[i] = min(_common_prefix_length(ids, conversation[i]) for conversation in full)
        return lengths, prompt_lengths

    def prompt_messages(self, row: dict) -> list[dict[str, str]]:
        """The turns before the reply, as the recipes render them (worker.conversations); a
        conversation's tools and tool calls in the Hermes text format, which every template takes."""
        return for_template(prompt_messages(row), row.get("tools"), native=False)[0]

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """The chat template's text, with control tokens typed in the data marked as text
        (apply_chat_template(..., sanitize_control_tokens=True)); through the layout's pieces
        when the fast path is trusted for it (see the module docstring)."""
        texts: list[str] = []
        unchecked: list[int] = []
        for messages in conversations:
            layout = self._layout(messages, add_generation_prompt)
            if layout.trusted:
                texts.append(layout.fill(messages, self.control_re))
            else:
                unchecked.append(len(texts))
                texts.append("")
        if unchecked:
            rendered = self.render_slowly([conversations[i] for i in unchecked], add_generation_prompt)
            for i, text in zip(unchecked, rendered, strict=True):
                texts[i] = text
                self._layout(conversations[i], add_generation_prompt).check(conversations[i], text, self.control_re)
        return texts

    def _layout(self, messages: list[dict], add_generation_prompt: bool) -> _Layout:
        key = (add_generation_prompt, tuple((message["role"], not message["content"]) for message in messages))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._new_layout(messages, add_generation_prompt)
        return layout

    def _new_layout(self, messages: list[dict], add_generation_prompt: bool) -> _Layout:
        filled = [i for i, message in enumerate(messages) if message["content"]]
        shape = [{"role": message["role"], "content": ""} for message in messages]
        try:
            return _Layout(self._placeholder_pieces(shape, filled, add_generation_prompt))
        except Exception:  # noqa: BLE001 - the real renderer meets (and reports) the same problem on the rows
            return _Layout(None)

    def _placeholder_pieces(self, shape: list[dict], filled: list[int], add_generation_prompt: bool) -> list | None:
        """The template's text around a placeholder for each filled content, if the probes render
        through these pieces exactly as through the real renderer."""
        placeholders = [dict(message) for message in shape]
        for i in filled:
            placeholders[i]["content"] = _PLACEHOLDER.format(i)
        parts = _PLACEHOLDER_RE.split(self.render_slowly([placeholders], add_generation_prompt)[0])
        if parts[1::2] != [str(i) for i in filled]:  # a content left out, repeated or reordered
            return None
        layout = _Layout(parts[0::2])
        probes = (*_PROBES, "typed special tokens: " + " ".join(self.template_vars.values()))
        for k in range(len(probes)):
            probed = [dict(message) for message in shape]
            for n, i in enumerate(filled):
                probed[i]["content"] = probes[(k + n) % len(probes)]
            if layout.fill(probed, self.control_re) != self.render_slowly([probed], add_generation_prompt)[0]:
                return None
        return layout.pieces

    def render_slowly(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """The chat template's text through transformers' renderer, one conversation at a time."""
        marked = [mark_control_tokens(messages, self.control_re) for messages in conversations]
        rendered, _ = render_jinja_template(
            conversations=marked,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            **self.template_vars,
        )
        return rendered

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        for i, text in enumerate(texts):
            # A control token typed in the data (marked): encoded as plain text. Every match of
            # markers_re holds a marker, and looking for the two characters is much quicker.
            if (_CONTROL_TOKEN_START in text or _CONTROL_TOKEN_END in text) and self.markers_re.search(text):
                ids[i] = encode_marked_chat(_TransformersView(self.tokenizer), text)
        return ids

    def _chat_template(self) -> tuple[str, dict[str, str]]:
        config = _read_json(self.model_dir / "tokenizer_config.json")
        jinja = self.model_dir / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ValueError("This base model has no chat template, so it cannot be instruction- or preference-tuned.")
        variables = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[key] = value
        variables.setdefault("pad_token", variables.get("eos_token") or variables.get("unk_token", ""))
        return template, variables

    def _control_patterns(self):
        """transformers' control tokens of this template (PreTrainedTokenizerBase._get_control_tokens)."""
        added = self.tokenizer.get_added_tokens_decoder().values()
        listed = _read_json(self.model_dir / "tokenizer_config.json").get("chat_control_tokens")
        if listed is not None:
            tokens = tuple(t.content for t in added if t.special or t.content in set(listed))
        else:
            literal = _get_template_literal_text(self.template)
            tokens = tuple(t.content for t in added if t.special or (t.content in literal and not t.content.isspace()))
        control_re, _ = _get_control_token_patterns(tokens)
        _, markers_re = _get_control_token_patterns(tuple(t.content for t in added))
        return control_re, markers_re


@dataclass
class _Layout:
    """The chat template's text for one message layout, cut where each non-empty content goes."""

    pieces: list[str] | None
    """None: the placeholders do not render as the real contents do; the real renderer is used."""
    checked: int = 0

    @property
    def trusted(self) -> bool:
        return self.pieces is not None and self.checked >= CHECKED_ROWS

    def fill(self, messages: list[dict], control_re: re.Pattern) -> str:
        parts = [self.pieces[0]]
        contents = [message["content"] for message in messages if message["content"]]
        for content, piece in zip(contents, self.pieces[1:], strict=True):
            parts.append(mark_control_tokens(content, control_re))
            parts.append(piece)
        return "".join(parts)

    def check(self, messages: list[dict], rendered: str, control_re: re.Pattern) -> None:
        """Compare the fast path with the real renderer's `rendered` text; one difference rules it out."""
        if self.pieces is None or self.checked >= CHECKED_ROWS:
            return
        if self.fill(messages, control_re) == rendered:
            self.checked += 1
        else:
            self.pieces = None


class _TransformersView:
    """The few tokenizer methods transformers' encode_marked_chat calls, on a `tokenizers` Tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.added_tokens_encoder = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        self.tokenizer.encode_special_tokens = split_special_tokens
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        return self.encode(text, split_special_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# The worker's held-out splits, on row numbers --------------------------------------------------


def split_positions(count: int, fraction: float, seed: int) -> np.ndarray:
    """The positions worker.rows.split_rows holds out of `count` items (a seeded shuffle)."""
    if fraction <= 0 or count < 2:
        return np.zeros(0, dtype=np.int64)
    order = array("q", range(count))  # 8 bytes an item, shuffled exactly as a list would be
    random.Random(seed).shuffle(order)
    return np.frombuffer(order, dtype=np.int64)[: held_count(count, fraction)].copy()


def grouped_positions(groups: np.ndarray, group_count: int, fraction: float, seed: int) -> np.ndarray:
    """The rows worker.rows.split_rows holds out; groups[i] numbers row i's input in order of
    first appearance (first_appearance_groups)."""
    if fraction <= 0 or len(groups) < 2:
        return np.zeros(0, dtype=np.int64)
    sizes = np.bincount(groups, minlength=group_count).tolist()
    held = held_groups(sizes, held_count(len(groups), fraction), seed)
    return np.flatnonzero(np.isin(groups, np.array(held, dtype=np.int64)))


def stratified_positions(
    labels: np.ndarray, names: list[str], groups: np.ndarray, group_count: int, fraction: float, seed: int
) -> np.ndarray:
    """The rows worker.rows.stratified_split holds out; labels[i] indexes names, groups[i] numbers
    row i's input in order of first appearance."""
    if fraction <= 0 or not len(labels):
        return np.zeros(0, dtype=np.int64)
    pairs, counts = np.unique(groups * len(names) + labels, return_counts=True)  # by group, then label
    pair_groups, pair_labels = pairs // len(names), pairs % len(names)
    by_label = {names[k]: pair_groups[pair_labels == k] for k in np.unique(pair_labels)}
    sizes = {names[k]: int(counts[pair_labels == k].sum()) for k in np.unique(pair_labels)}
    compositions = _Compositions(np.searchsorted(pair_groups, np.arange(group_count + 1)), pair_labels, counts, names)
    held = stratified_groups(by_label, compositions, sizes, fraction, seed)
    return np.flatnonzero(np.isin(groups, np.array(held, dtype=np.int64)))


@dataclass
class _Compositions:
    """Each group's rows by label, read off the sorted (group, label) pairs: a few arrays, not a
    dict a group."""

    starts: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, group: int) -> dict[str, int]:
        start, end = self.starts[group], self.starts[group + 1]
        return {self.names[k]: int(n) for k, n in zip(self.labels[start:end], self.counts[start:end], strict=True)}


def first_appearance_groups(digests: np.ndarray) -> tuple[np.ndarray, int]:
    """(group of each row, group count): groups numbered in order of first appearance, as a
    dict.fromkeys over the rows' values would order them."""
    if not len(digests):
        return np.zeros(0, dtype=np.int64), 0
    unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    rank = np.empty(len(unique), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(unique))
    return rank[inverse], len(unique)


# The report ------------------------------------------------------------------------------------


@dataclass
class _Columns:
    """What each row leaves behind: compact numbers, never its text."""

    row_digest: array = field(default_factory=lambda: array("Q"))
    input_digest: array = field(default_factory=lambda: array("Q"))
    group_digest: array = field(default_factory=lambda: array("Q"))
    """The label (classify, pair) or the query (rerank, embed)."""
    length: array = field(default_factory=lambda: array("q"))
    label: array = field(default_factory=lambda: array("q"))
    """The label's number in `label_names` (order of first appearance), -1 past LABEL_LIMIT."""
    label_names: dict[str, int] = field(default_factory=dict)
    relevance: array = field(default_factory=lambda: array("d"))


@dataclass
class _Problem:
    key: str
    title: str
    count: int = 0
    examples: list[dict] = field(default_factory=list)

    def add(self, row: int, **details) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"row": row, **details})


def compute_report(
    rows_path: str | Path,
    task: str,
    model_dir: str | Path,
    max_length: int,
    validation_path: str | Path | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
) -> dict[str, Any]:
    """The quality report of the canonical rows at `rows_path` for `task` (see the module docstring).

    `validation_path` (canonical rows of an uploaded validation file) replaces the worker's seeded
    split (`validation_fraction`, `seed`) as the held-out set.
    """
    started = time.perf_counter()
    counter = TokenCounter(model_dir, task, max_length)
    columns = _Columns()
    problems = _problems_for(task)
    _measure_rows(rows_path, task, counter, problems, columns)
    count = len(columns.length)
    lengths = np.frombuffer(columns.length, dtype=np.int64) if count else np.zeros(0, dtype=np.int64)
    row_digests = np.frombuffer(columns.row_digest, dtype=np.uint64)
    input_digests = np.frombuffer(columns.input_digest, dtype=np.uint64)
    _find_duplicates(row_digests, problems["duplicates"])
    split = _find_overlap(task, columns, input_digests, validation_path, validation_fraction, seed, problems["overlap"])
    if task == "rerank":
        _find_queries_without_relevant(columns, problems["no_relevant"])
    unused = _unused_optional_fields(task, problems, count)
    _fill_snippets(rows_path, task, problems, validation_path)
    longest = int(np.argmax(lengths)) + 1 if count else None
    return {
        "task": task,
        "rows": count,
        "max_length": max_length,
        "cutoff": counter.cutoff,
        "tokens": _length_summary(lengths, counter.cutoff),
        "longest_row": longest,
        "labels": _label_balance(task, columns),
        "split": split,
        "unused_optional": unused,
        "problems": [
            {"key": p.key, "title": p.title, "count": p.count, "examples": p.examples} for p in problems.values()
        ],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _measure_rows(rows_path, task: str, counter: TokenCounter, problems: dict[str, _Problem], columns: _Columns) -> None:
    """One pass over the rows, a batch at a time: each row's tokens and its per-row checks."""
    for batch in _batches(read_rows(rows_path), BATCH_ROWS):
        rows = [row for _, row in batch]
        lengths, prompt_lengths = counter.lengths(rows)
        columns.length.extend(lengths)
        for (number, row), length, prompt_length in zip(batch, lengths, prompt_lengths, strict=True):
            if length > counter.cutoff and task != "domain":  # a document is packed across rows, not cut
                problems["truncated"].add(number, tokens=length)
            if prompt_length >= counter.cutoff:
                problems["no_reply"].add(number, prompt_tokens=prompt_length)
            _check_row(task, number, row, problems, columns)


def _problems_for(task: str) -> dict[str, _Problem]:
    problems = [
        _Problem("truncated", "Rows longer than the cutoff (cut at the cutoff)"),
        _Problem("duplicates", "Exact duplicate rows"),
        _Problem("overlap", "Validation rows whose input is also in training"),
        _Problem("placeholders", "Rows with a templating placeholder left in, such as {{name}} or {name}"),
    ]
    if task in CHAT_TASKS:
        problems.insert(1, _Problem("no_reply", "Rows whose prompt fills the cutoff (skipped: no reply token left)"))
    if task == "dpo":
        problems.append(_Problem("same_pair", "Pairs whose chosen equals rejected (no preference)"))
    if task == "rerank":
        problems.append(_Problem("no_relevant", "Queries with no relevant document"))
    for name in OPTIONAL_FIELDS.get(task, ()):
        problems.append(_Problem(f"empty_{name}", f"Rows without the optional field {name}"))
    return {p.key: p for p in problems}


def _check_row(task: str, number: int, row: dict, problems: dict[str, _Problem], columns: _Columns) -> None:
    """Per-row checks and the row's digests."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False)
    columns.row_digest.append(_digest(text))
    columns.input_digest.append(_digest(row_input(row)))
    if task in ("rerank", "embed"):
        columns.group_digest.append(_digest(normalised(row["query"])))
    if task == "rerank":
        columns.relevance.append(float(row["relevance"]))
    label = _label_of(task, row)
    if label is not None:
        number_of_label = columns.label_names.get(label)
        if number_of_label is None and len(columns.label_names) < LABEL_LIMIT:
            number_of_label = columns.label_names[label] = len(columns.label_names)
        columns.label.append(-1 if number_of_label is None else number_of_label)
    if not row.keys() & CONVERSATION_FIELDS:  # a conversation's system prompt is one of its turns
        for name in OPTIONAL_FIELDS.get(task, ()):
            if not row.get(name):
                problems[f"empty_{name}"].add(number)
    placeholder = _MAYBE_PLACEHOLDER.search(text) and _placeholder_in(row)
    if placeholder:
        problems["placeholders"].add(number, placeholder=placeholder)
    if task == "dpo" and row["chosen"].strip() == row["rejected"].strip():
        problems["same_pair"].add(number)


def _placeholder_in(value: Any) -> str | None:
    """The first templating placeholder ({{name}}, {name}, ${name}) in the row's texts, if any:
    a prompt template whose variables were never filled in. Braces after a word or a closing
    brace are LaTeX (\\textbf{word}, \\frac{a}{b}), not placeholders."""
    if isinstance(value, str):
        found = _TEMPLATE_PLACEHOLDER.search(value) if "{" in value else None
        return found.group(0) if found else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := _placeholder_in(item))), None)


def _unused_optional_fields(task: str, problems: dict[str, _Problem], count: int) -> list[str]:
    """The optional fields no row fills: not a problem of every row, just a field this dataset
    does not use; their checks are left out of the report, and the fields named instead."""
    unused = [name for name in OPTIONAL_FIELDS.get(task, ()) if count and problems[f"empty_{name}"].count == count]
    for name in unused:
        del problems[f"empty_{name}"]
    return unused


def _label_of(task: str, row: dict) -> str | None:
    if task in ("classify", "pair"):
        return str(row["label"]).strip()  # as the recipe compares labels
    if task == "rerank":
        return f"{float(row['relevance']):g}"
    return None


def _digest(text: str) -> int:
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _find_duplicates(digests: np.ndarray, problem: _Problem) -> None:
    if not len(digests):
        return
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    repeat = np.ones(len(digests), dtype=bool)
    repeat[first] = False
    problem.count = int(repeat.sum())
    for index in np.flatnonzero(repeat)[:EXAMPLES]:
        problem.examples.append({"row": int(index) + 1, "same_as": int(first[inverse[index]]) + 1})


def _find_overlap(
    task: str,
    columns: _Columns,
    input_digests: np.ndarray,
    validation_path: str | Path | None,
    fraction: float,
    seed: int,
    problem: _Problem,
) -> dict[str, Any]:
    """Count the held-out rows whose input is also a training row's; return how rows were split."""
    if validation_path and Path(validation_path).is_file():
        held_digests = array("Q")
        for _, row in read_rows(validation_path):
            held_digests.append(_digest(row_input(row)))
        held = np.frombuffer(held_digests, dtype=np.uint64)
        in_training = np.isin(held, input_digests)
        problem.count = int(in_training.sum())
        problem.examples = [{"row": int(i) + 1, "file": "validation"} for i in np.flatnonzero(in_training)[:EXAMPLES]]
        return {"kind": "file", "train_rows": len(input_digests), "validation_rows": len(held)}
    mask = np.zeros(len(input_digests), dtype=bool)
    mask[_held_out_rows(task, columns, fraction, seed)] = True
    in_training = mask & np.isin(input_digests, input_digests[~mask])
    problem.count = int(in_training.sum())
    problem.examples = [{"row": int(i) + 1} for i in np.flatnonzero(in_training)[:EXAMPLES]]
    held = int(mask.sum())
    return {
        "kind": "seeded",
        "seed": seed,
        "fraction": fraction,
        "train_rows": len(mask) - held,
        "validation_rows": held,
    }


def _held_out_rows(task: str, columns: _Columns, fraction: float, seed: int) -> np.ndarray:
    """The row numbers (0-based) the worker's recipe for `task` holds out."""
    if task in ("classify", "pair"):
        names = sorted(columns.label_names)
        sorted_number = np.array([names.index(name) for name in columns.label_names], dtype=np.int64)
        labels = sorted_number[np.frombuffer(columns.label, dtype=np.int64)]
        return stratified_positions(labels, names, *_input_groups(columns), fraction, seed)
    if task not in ("rerank", "embed"):
        return grouped_positions(*_input_groups(columns), fraction, seed)
    groups, group_count = first_appearance_groups(np.frombuffer(columns.group_digest, dtype=np.uint64))
    if task == "rerank":
        # Only queries with a relevant document are held out (rerank.split_by_query).
        best = np.zeros(group_count)
        np.maximum.at(best, groups, np.frombuffer(columns.relevance, dtype=np.float64))
        eligible = np.flatnonzero(best > 0)
        held = eligible[split_positions(len(eligible), fraction, seed)]
    else:
        held = split_positions(group_count, fraction, seed)
    return np.flatnonzero(np.isin(groups, held))


def _input_groups(columns: _Columns) -> tuple[np.ndarray, int]:
    return first_appearance_groups(np.frombuffer(columns.input_digest, dtype=np.uint64))


def _find_queries_without_relevant(columns: _Columns, problem: _Problem) -> None:
    groups, group_count = first_appearance_groups(np.frombuffer(columns.group_digest, dtype=np.uint64))
    best = np.zeros(group_count)
    np.maximum.at(best, groups, np.frombuffer(columns.relevance, dtype=np.float64))
    empty = best <= 0
    problem.count = int(empty.sum())
    if problem.count:
        _, first = np.unique(groups, return_index=True)
        problem.examples = [{"row": int(first[g]) + 1} for g in np.flatnonzero(empty)[:EXAMPLES]]


def _length_summary(lengths: np.ndarray, cutoff: int) -> dict[str, Any]:
    if not len(lengths):
        return {"bin_width": 1, "counts": [], "truncated": 0, "max": 0, "mean": 0, "p50": 0, "p95": 0}
    top = max(int(lengths.max()), cutoff) + 1
    width = max(1, -(-top // HISTOGRAM_BINS))
    counts = np.bincount(lengths // width, minlength=-(-top // width))
    return {
        "bin_width": width,
        "counts": counts.tolist(),
        "truncated": int((lengths > cutoff).sum()),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
    }


def _label_balance(task: str, columns: _Columns) -> dict[str, Any] | None:
    if task not in ("classify", "pair", "rerank"):
        return None
    numbers = np.frombuffer(columns.label, dtype=np.int64)
    counts = np.bincount(numbers[numbers >= 0], minlength=len(columns.label_names))
    ranked = sorted(zip(columns.label_names, counts.tolist(), strict=True), key=lambda item: (-item[1], item[0]))
    if task == "rerank":
        ranked.sort(key=lambda item: float(item[0]))
    shown, rest = ranked[:MAX_LABELS], ranked[MAX_LABELS:]
    return {
        "kind": "relevance" if task == "rerank" else "label",
        "counts": [[name, count] for name, count in shown],
        "other": int((numbers < 0).sum()) + sum(count for _, count in rest),
        "distinct": len(columns.label_names),
    }


def _fill_snippets(rows_path, task: str, problems: dict[str, _Problem], validation_path) -> None:
    """Put a short quote of each example row into its example (one more scan, no parsing but theirs)."""
    wanted: dict[tuple[str, int], list[dict]] = {}
    for problem in problems.values():
        for example in problem.examples:
            wanted.setdefault((example.get("file", "training"), example["row"]), []).append(example)
    for file, path in (("training", rows_path), ("validation", validation_path)):
        numbers = {row for (name, row) in wanted if name == file}
        if not numbers or not path:
            continue
        for number, row in read_rows(path, only=numbers):
            for example in wanted[(file, number)]:
                example["text"] = _snippet(task, row)


def _snippet(task: str, row: dict) -> str:
    if row.keys() & CONVERSATION_FIELDS:
        return transcript(row, SNIPPET_CHARS)
    names = {
        "sft": ("instruction", "response"),
        "dpo": ("prompt", "chosen", "rejected"),
        "kto": ("prompt", "completion", "label"),
        "domain": ("text",),
        "classify": ("text", "label"),
        "pair": ("text_a", "text_b", "label"),
        "rerank": ("query", "document", "relevance"),
        "embed": ("query", "positive"),
    }[task]
    text = " · ".join(f"{name}: {row.get(name, '')}" for name in names)
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


# Reading -----------------------------------------------------------------------------------------


def read_rows(path: str | Path, only: set[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row) of a canonical JSONL file; with `only`, just those rows (the
    others are not parsed)."""
    with Path(path).open("rb") as f:
        number = 0
        for line in f:
            if not line.strip():
                continue
            number += 1
            if only is None or number in only:
                yield number, json.loads(line)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
