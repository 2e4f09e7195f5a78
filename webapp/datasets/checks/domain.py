"""Is this data usable for domain adaptation? Pure Python, one pass, bounded memory.

Rows are canonical {"text"}: one document each. The data is refused when:
- it has no rows;
- a document has no text (the recipe would stop at that row);
- every document (two or more) is the same text, compared with surrounding whitespace trimmed:
  the model would learn one text by heart, which is almost always a wrongly mapped column.
A single document is fine: it is trained on, and a validation file measures it.
"""

from __future__ import annotations

from collections.abc import Iterable

EXAMPLES = 3  # how many offending rows a message quotes


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for domain adaptation; empty when usable."""
    count, usable = 0, 0
    missing: list[str] = []
    first: str | None = None
    all_same = True
    for number, row in enumerate(rows, start=1):
        count += 1
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            if len(missing) < EXAMPLES:
                missing.append(f"row {number}")
            continue
        usable += 1
        first = text.strip() if first is None else first
        all_same = all_same and text.strip() == first
    if count == 0:
        return ["The dataset has no rows."]
    problems = []
    if usable < count:
        problems.append(f"{count - usable} document(s) have no text, e.g. {', '.join(missing)}.")
    if usable >= 2 and all_same:
        problems.append(
            "Every document is the same text; the model would learn it by heart. Check that the text "
            "column holds each document's own text."
        )
    return problems
