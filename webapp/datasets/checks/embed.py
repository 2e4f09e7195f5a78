"""Is this data usable for training an embedding model? Pure Python, one pass, bounded memory.

Rows are canonical {"query", "positive", optional "negative"}. Training picks each query's
positive out of the other rows' documents, so the data is refused when:
- it has fewer than 2 rows;
- a query or positive is missing or empty (the recipe would stop at that row);
- every row has the same query, or the same positive: there is nothing to tell apart;
- every positive is a copy of its query: the model would only learn that a text matches itself.
A few rows whose positive copies the query are not refused: they teach little, but no harm.
"""

from __future__ import annotations

from collections.abc import Iterable

EXAMPLES = 3  # how many offending rows a message quotes


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for embedding training; empty when usable."""
    count = 0
    missing: list[str] = []
    missing_count = 0
    copies = 0
    first: dict | None = None
    same_query = same_positive = True
    for number, row in enumerate(rows, start=1):
        count += 1
        query, positive = row.get("query"), row.get("positive")
        if not _is_text(query) or not _is_text(positive):
            missing_count += 1
            if len(missing) < EXAMPLES:
                missing.append(f"row {number}")
            continue
        copies += query.strip() == positive.strip()
        if first is None:
            first = {"query": query, "positive": positive}
        same_query = same_query and query == first["query"]
        same_positive = same_positive and positive == first["positive"]

    if count < 2:
        return [
            f"The dataset has {count} row{'' if count == 1 else 's'}; an embedding model learns by "
            "telling each query's positive apart from the other rows' documents, so it needs at least 2."
        ]
    problems = []
    if missing_count:
        problems.append(f"{missing_count} row(s) have no query or no positive text, e.g. {', '.join(missing)}.")
    usable = count - missing_count
    if usable >= 2 and same_query:
        problems.append(
            f"Every row has the same query ({first['query']!r}); the model needs different queries "
            "to learn which document belongs to which."
        )
    elif usable >= 2 and same_positive:
        problems.append(
            f"Every row has the same positive ({first['positive']!r}); the model needs different "
            "positives to learn which document belongs to which query."
        )
    if usable and copies == usable:
        problems.append(
            "Every positive is a copy of its query, so the model would only learn that a text "
            "matches itself. The positive should be the document that answers the query."
        )
    return problems


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
