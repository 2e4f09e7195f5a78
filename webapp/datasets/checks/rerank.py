"""Is this data usable for training a reranker? Pure Python, one pass, bounded memory.

Rows are canonical {"query", "document", "relevance"}. The data is refused when:
- it has no rows;
- a relevance is not a number of at least 0 (the recipe would stop at that row);
- no document at all has a relevance above 0: with nothing relevant there is nothing to rank
  first. A query without a relevant document is fine while others have one (it still shows
  the model what does not answer);
- every document has the same relevance: there is no order to learn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

EXAMPLES = 3  # how many offending rows or queries a message quotes


@dataclass
class _Tally:
    """What one pass over the rows found."""

    count: int = 0
    bad_relevance: list[str] = field(default_factory=list)
    """The first EXAMPLES rows whose relevance is not a number of at least 0."""
    bad_relevance_count: int = 0
    relevances: set[float] = field(default_factory=set)
    """At most two values are kept: enough to see a difference."""
    any_relevant: bool = False
    queries: list[str] = field(default_factory=list)
    """The first few, quoted when none has a relevant document."""

    def add(self, number: int, row: dict) -> None:
        self.count += 1
        relevance = row.get("relevance")
        if not _is_relevance(relevance):
            self.bad_relevance_count += 1
            if len(self.bad_relevance) < EXAMPLES:
                self.bad_relevance.append(f"row {number} ({relevance!r})")
            return
        self.any_relevant = self.any_relevant or relevance > 0
        if len(self.relevances) < 2:
            self.relevances.add(float(relevance))
        if len(self.queries) < EXAMPLES and row.get("query") not in self.queries:
            self.queries.append(row.get("query"))


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for reranking; empty when usable."""
    tally = _Tally()
    for number, row in enumerate(rows, start=1):
        tally.add(number, row)
    if tally.count == 0:
        return ["The dataset has no rows."]
    return _problems(tally)


def _problems(tally: _Tally) -> list[str]:
    problems = []
    if tally.bad_relevance_count:
        problems.append(
            f"{tally.bad_relevance_count} row(s) have a relevance that is not a number of at least 0, e.g. "
            f"{', '.join(tally.bad_relevance)}. Use 0 for a document that does not answer its query and 1 "
            "(or 1 to 3, graded) for one that does."
        )
    if tally.relevances and not tally.any_relevant:
        quoted = ", ".join(repr(query) for query in tally.queries)
        problems.append(
            f"No query has a relevant document: every relevance is 0 (e.g. the queries {quoted}). "
            "A reranker learns to put relevant documents first; mark the documents that answer "
            "each query with relevance 1 (or 1 to 3, graded)."
        )
    elif len(tally.relevances) == 1:
        problems.append(
            f"Every document has relevance {next(iter(tally.relevances)):g}, so there is no order to "
            "learn. Add documents that do not answer their query, with relevance 0."
        )
    return problems


def _is_relevance(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf
