"""A recipe's rows: read from the normalised JSONL files, and split into training and held-out rows."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.errors import UserError


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


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, then `fraction` of the rows held out (at least one)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: held_count(len(rows), fraction)])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [row for i, row in enumerate(rows) if i in held_out],
    )


def hold_out_queries(rows: list[dict], queries: list[str], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded share of `queries` (those that may be held out) is held out
    with all of its rows, so the evaluation sees only queries the model never trained on."""
    _, held = split_rows(queries, fraction, seed)
    held = set(held)
    return [row for row in rows if row["query"] not in held], [row for row in rows if row["query"] in held]


def stratified_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): round(fraction · rows) rows held out (at least one), shared among the
    labels in proportion to their size (largest remainders first), every label keeping at least
    one training row; which rows of a label are held out is a seeded shuffle."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_label[row["label"]].append(index)
    if fraction <= 0:
        return rows, []
    counts = stratified_counts({label: len(indices) for label, indices in by_label.items()}, fraction, len(rows))
    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        held_out.update(indices[: counts[label]])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [row for i, row in enumerate(rows) if i in held_out],
    )


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
