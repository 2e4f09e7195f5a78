"""Can this data train a classifier? For the tasks classify ({"text", "label"} rows) and pair
({"text_a", "text_b", "label"} rows).

`check(rows)` reads the canonical rows once and returns the problems that make them unusable,
each a sentence for the person who uploaded them; no problems, an empty list. Memory stays
bounded: one count per label, for at most MAX_LABELS labels. Pure Python (no torch).

Unusable:
- no rows;
- fewer than two labels: a classifier has nothing to choose between;
- every label on a single row: nothing can be held out to measure the classifier, and one
  example per class teaches it nothing (usually the label column is mapped to a text column);
- more than MAX_LABELS labels: the same mistake, or a task that is not classification.

Fine (not reported): unbalanced labels, some labels with a single row (they stay in the training
split), duplicate rows. Labels are compared as the recipe compares them: with surrounding
spaces trimmed, so "spam" and "spam " are one label.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_LABELS = 1000


def check(rows: Iterable[dict]) -> list[str]:
    counts: dict[str, int] = {}
    total = 0
    too_many = False
    for row in rows:
        total += 1
        label = str(row.get("label", "")).strip()
        if label in counts:
            counts[label] += 1
        elif len(counts) < MAX_LABELS:
            counts[label] = 1
        else:
            too_many = True
    if not total:
        return ["The dataset has no rows."]
    if too_many:
        return [
            f"The label column has more than {MAX_LABELS} different values; a classifier needs a "
            "small set of labels. Is the label column mapped to a text column?"
        ]
    if len(counts) < 2:
        return [f"The label column has only one class ({next(iter(counts))!r}); a classifier needs at least two."]
    if max(counts.values()) == 1:
        return [
            f"Every label occurs only once ({total} rows, {total} labels); a classifier needs several "
            "examples of each label. Is the label column mapped to a text column?"
        ]
    return []
