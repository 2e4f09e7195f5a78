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
from dataclasses import dataclass, field

from webapp.datasets.checks import is_text

EXAMPLES = 3  # how many offending rows a message quotes


@dataclass
class _Tally:
    """What one pass over the rows found."""

    count: int = 0
    missing: list[str] = field(default_factory=list)
    """The first EXAMPLES rows with no query or no positive."""
    missing_count: int = 0
    copies: int = 0
    """Rows whose positive is their query."""
    first: dict | None = None
    same_query: bool = True
    same_positive: bool = True

    def add(self, number: int, row: dict) -> None:
        self.count += 1
        query, positive = row.get("query"), row.get("positive")
        if not is_text(query) or not is_text(positive):
            self.missing_count += 1
            if len(self.missing) < EXAMPLES:
                self.missing.append(f"row {number}")
            return
        self.copies += query.strip() == positive.strip()
        if self.first is None:
            self.first = {"query": query, "positive": positive}
        self.same_query = self.same_query and query == self.first["query"]
        self.same_positive = self.same_positive and positive == self.first["positive"]


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for embedding training; empty when usable."""
    tally = _Tally()
    for number, row in enumerate(rows, start=1):
        tally.add(number, row)
    if tally.count < 2:
        return [
            f"The dataset has {tally.count} row{'' if tally.count == 1 else 's'}; an embedding model learns by "
            "telling each query's positive apart from the other rows' documents, so it needs at least 2."
        ]
    return _problems(tally)


def _problems(tally: _Tally) -> list[str]:
    problems = []
    if tally.missing_count:
        problems.append(
            f"{tally.missing_count} row(s) have no query or no positive text, e.g. {', '.join(tally.missing)}."
        )
    usable = tally.count - tally.missing_count
    if usable >= 2 and tally.same_query:
        problems.append(
            f"Every row has the same query ({tally.first['query']!r}); the model needs different queries "
            "to learn which document belongs to which."
        )
    elif usable >= 2 and tally.same_positive:
        problems.append(
            f"Every row has the same positive ({tally.first['positive']!r}); the model needs different "
            "positives to learn which document belongs to which query."
        )
    if usable and tally.copies == usable:
        problems.append(
            "Every positive is a copy of its query, so the model would only learn that a text "
            "matches itself. The positive should be the document that answers the query."
        )
    return problems
