"""A recipe's rows: read from the normalised JSONL files, and split into training and held-out rows.

The splits never leak: rows with the same input (row_input: what the model reads, whitespace-
normalised) are all trained on or all held out, so a held-out score measures generalisation,
not memory. worker/quality.py takes the same splits on row numbers (with held_groups and
stratified_groups) to report them before anything trains."""

from __future__ import annotations

import json
import random
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from hashlib import blake2b
from pathlib import Path
from typing import Any

from worker.errors import UserError
from worker.families import FAMILIES

INPUT_FIELDS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.inputs))
"""Every family's input fields (Family.inputs): a field is an input wherever it appears
(tests/test_rows_split.py checks it), so the ones a row has are what its model reads."""


def read_rows(
    path: Path,
    fields: tuple[str, ...],
    source: str = "the dataset",
    keep: Callable[[dict, str], dict] | None = None,
    fields_named: str = "",
) -> list[dict[str, Any]]:
    """The JSONL rows of `path` (blank lines skipped), each an object with text in every one of
    `fields` (named so in the error message, by default "a, b and c"). `keep(row, where)`, when
    given, checks the row's other values and returns what is kept of it; `where` ("Line 3 of the
    dataset") starts its error messages."""
    fields_named = fields_named or f"{', '.join(fields[:-1])} and {fields[-1]}"
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"Line {number} of {source}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON: {exc.msg}.") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(name), str) for name in fields):
            raise UserError(f"{where} needs text fields {fields_named}.")
        rows.append(keep(row, where) if keep else row)
    if not rows:
        raise UserError(f"{source[0].upper()}{source[1:]} has no rows.")
    return rows


def split_rows(rows: list, fraction: float, seed: int, key: Callable[[Any], str] | None = None) -> tuple[list, list]:
    """(train, held out), every input on one side only: the rows are grouped by `key` (by
    default row_input, what a model reads from a row), and held_groups picks a seeded share of
    the groups, held_count(rows) rows at most (about `fraction`; see held_groups). Without
    repeated inputs this is a seeded shuffle of the rows with the first held_count held out."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    groups = group_rows(rows, key or row_input)
    held = held_groups([len(group) for group in groups], held_count(len(rows), fraction), seed)
    return _partition(rows, {i for g in held for i in groups[g]})


def hold_out_queries(rows: list[dict], queries: list[str], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded share of `queries` (those that may be held out) is held out
    with all of its rows, so the evaluation sees only queries the model never trained on.
    Queries are compared whitespace-normalised, so "a  query" and "a query " are one query."""
    distinct = list(dict.fromkeys(normalised(query) for query in queries))
    _, held = split_rows(distinct, fraction, seed, key=str)
    held = set(held)
    return (
        [row for row in rows if normalised(row["query"]) not in held],
        [row for row in rows if normalised(row["query"]) in held],
    )


def stratified_split(
    rows: list[dict], fraction: float, seed: int, key: Callable[[Any], str] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train, held out), every input on one side only: the rows are grouped by `key` (by
    default row_input) and stratified_groups holds out groups so that each label keeps its share
    of the held-out rows as closely as the groups allow, and at least one training row. Without
    repeated inputs: round(fraction · rows) rows held out (at least one), shared among the labels
    in proportion to their size (largest remainders first), a seeded shuffle within each label."""
    if fraction <= 0:
        return rows, []
    groups = group_rows(rows, key or row_input)
    compositions = [Counter(rows[i]["label"] for i in group) for group in groups]
    by_label: dict[str, list[int]] = defaultdict(list)
    for number, composition in enumerate(compositions):
        for label in composition:
            by_label[label].append(number)
    sizes = Counter(row["label"] for row in rows)
    held = stratified_groups(by_label, compositions, sizes, fraction, seed)
    return _partition(rows, {i for g in held for i in groups[g]})


def validation_split(
    rows: list, validation: list, drop_overlap: bool, key: Callable[[Any], str] | None = None, new_first: bool = False
) -> tuple[list, list]:
    """(train, held out) with an uploaded validation file: every row trains, except, when
    `drop_overlap` (TrainChoices.drop_validation_overlap), those whose input (`key`, by default
    row_input) a validation row has. The validation rows keep their order; with `new_first`
    those whose input is also in training come last, so that a generative recipe's sample
    replies (to the first held-out prompts) answer prompts new to the model whenever the file
    has enough of them."""
    key = key or row_input
    held_inputs = {key(row) for row in validation}
    train = [row for row in rows if key(row) not in held_inputs] if drop_overlap else rows
    if not train:
        raise UserError(
            "Every training row's input is also in the validation file, so dropping those rows leaves "
            "nothing to train on. Train without dropping them, or upload a validation file of other inputs."
        )
    if not new_first or drop_overlap:
        return train, validation
    train_inputs = {key(row) for row in train}
    new = [row for row in validation if key(row) not in train_inputs]
    return train, new + [row for row in validation if key(row) in train_inputs]


def validation_rows_in_training(validation_path: Path, training_path: Path) -> int:
    """How many rows of the validation file have an input (row_input) that a training row also
    has. Both files are read a line at a time; only a digest per validation input is kept."""
    counts: Counter = Counter(_input_digests(validation_path))
    found = {digest for digest in _input_digests(training_path) if digest in counts}
    return sum(counts[digest] for digest in found)


def _input_digests(path: Path) -> Iterator[bytes]:
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                yield blake2b(row_input(json.loads(line)).encode("utf-8", "surrogatepass"), digest_size=8).digest()


# Grouping rows by their input ------------------------------------------------------------------


def normalised(text: str) -> str:
    """`text` stripped, each run of whitespace (spaces, tabs, newlines) one space. Case is kept:
    a cased tokenizer reads "Paris" and "paris" as different inputs."""
    return " ".join(text.split())


def row_input(row: dict) -> str:
    """What a model reads from a row, whitespace-normalised, as one string: rows with the same
    are the same input, which must not be both trained on and held out.

    A conversation ({"messages": [...]}) is read without its final assistant turn (the reply it
    is trained to write) and without its tools, so conversations that differ only in the tools
    offered count as one input (the cautious side); a prompt given as turns ({"prompt_messages": [...]}) whole; other rows
    by their family's input fields (Family.inputs), every family's being looked up, since a row
    holds only its own family's fields."""
    if "messages" in row:
        messages = row["messages"]
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return json.dumps(_normalised_texts(messages), ensure_ascii=False, sort_keys=True)
    if "prompt_messages" in row:
        return json.dumps(_normalised_texts(row["prompt_messages"]), ensure_ascii=False, sort_keys=True)
    return "\x1f".join([f"{name}\x1e{normalised(str(row[name]))}" for name in INPUT_FIELDS if row.get(name)])


def pair_input(pair: tuple) -> str:
    """row_input of the row in a (row, anything) pair, such as a row with its tokens."""
    return row_input(pair[0])


def group_rows(rows: list, key: Callable[[Any], str]) -> list[list[int]]:
    """The indices of the rows, grouped by `key`, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(key(row), []).append(index)
    return list(groups.values())


def held_groups(sizes: Sequence[int], target: int, seed: int) -> list[int]:
    """The groups (numbers into `sizes`, their row counts) a seeded split holds out: in a seeded
    order, each group that still fits in `target` rows, until `target` is reached; a group too
    large to fit stays in training. So at most `target` rows are held out, fewer only when no
    remaining group fits exactly. When no group fits at all (every input repeats more often than
    `target`), the first smallest group in that order is held out, so that something is evaluated,
    provided another group is left to train."""
    order = array("q", range(len(sizes)))  # 8 bytes a group, shuffled exactly as a list would be
    random.Random(seed).shuffle(order)
    held: list[int] = []
    count = 0
    for group in order:
        if count == target:
            break
        if count + sizes[group] <= target:
            held.append(group)
            count += sizes[group]
    if not held and len(sizes) > 1:
        held.append(min(order, key=sizes.__getitem__))
    return held


def stratified_groups(
    by_label: dict[str, Sequence[int]],
    compositions: Sequence[dict[str, int]],
    sizes: dict[str, int],
    fraction: float,
    seed: int,
) -> list[int]:
    """The groups a stratified split holds out. `by_label` lists the groups holding each label
    (in order of first appearance), `compositions[group]` counts its rows by label, `sizes` the
    rows of each label. Each label's target is stratified_counts'; label by label (sorted), its
    groups are shuffled (seeded) and each one not yet decided is held out if it fits in the
    targets of all its labels, until the label's target is reached. So no label goes past its
    target and every label keeps a training row. When nothing fits, the smallest group (first in
    a seeded order) that leaves every label a training row is held out, if there is one."""
    targets = stratified_counts(dict(sizes), fraction, sum(sizes.values()))
    rng = random.Random(seed)
    decided = bytearray(len(compositions))
    held: list[int] = []
    held_rows: Counter = Counter()
    for label in sorted(by_label):
        order = array("q", by_label[label])
        rng.shuffle(order)
        for group in order:
            if held_rows[label] >= targets[label]:
                break
            if decided[group]:
                continue
            decided[group] = 1
            rows = compositions[group]
            if all(held_rows[name] + count <= targets[name] for name, count in rows.items()):
                held.append(group)
                held_rows.update(rows)
    if not held:
        order = array("q", range(len(decided)))
        rng.shuffle(order)
        leaving = [g for g in order if all(count < sizes[name] for name, count in compositions[g].items())]
        if leaving:
            held.append(min(leaving, key=lambda g: sum(compositions[g].values())))
    return held


def _normalised_texts(value: Any) -> Any:
    if isinstance(value, str):
        return normalised(value)
    if isinstance(value, list):
        return [_normalised_texts(item) for item in value]
    if isinstance(value, dict):
        return {name: _normalised_texts(item) for name, item in value.items()}
    return value


def _partition(rows: list, held: set[int]) -> tuple[list, list]:
    return [row for i, row in enumerate(rows) if i not in held], [row for i, row in enumerate(rows) if i in held]


def held_count(count: int, fraction: float) -> int:
    """How many of `count` items a seeded split holds out: `fraction` of them, at least one, never all."""
    return min(max(1, round(fraction * count)), count - 1)


def stratified_counts(sizes: dict[str, int], fraction: float, total: int) -> dict[str, int]:
    """How many rows of each label a stratified split holds out: round(fraction · total) in all
    (at least one), shared in proportion to the labels' sizes (largest remainders first), every
    label keeping at least one training row."""
    shares = {label: fraction * size for label, size in sizes.items()}
    counts = {label: min(int(share), sizes[label] - 1) for label, share in shares.items()}
    missing = max(1, round(fraction * total)) - sum(counts.values())
    for label in sorted(sizes, key=lambda name: (int(shares[name]) - shares[name], name)):
        if missing > 0 and counts[label] < sizes[label] - 1:
            counts[label] += 1
            missing -= 1
    return counts
