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

EXAMPLES = 3  # how many offending rows or queries a message quotes


def check(rows: Iterable[dict]) -> list[str]:
    """Human-readable problems that make `rows` unusable for reranking; empty when usable."""
    count = 0
    bad_relevance: list[str] = []
    bad_relevance_count = 0
    relevances: set[float] = set()  # at most two values are kept: enough to see a difference
    any_relevant = False
    queries: list[str] = []  # the first few, quoted when none has a relevant document
    for number, row in enumerate(rows, start=1):
        count += 1
        relevance = row.get("relevance")
        if not _is_relevance(relevance):
            bad_relevance_count += 1
            if len(bad_relevance) < EXAMPLES:
                bad_relevance.append(f"row {number} ({relevance!r})")
            continue
        any_relevant = any_relevant or relevance > 0
        if len(relevances) < 2:
            relevances.add(float(relevance))
        if len(queries) < EXAMPLES and row.get("query") not in queries:
            queries.append(row.get("query"))

    if count == 0:
        return ["The dataset has no rows."]
    problems = []
    if bad_relevance_count:
        problems.append(
            f"{bad_relevance_count} row(s) have a relevance that is not a number of at least 0, e.g. "
            f"{', '.join(bad_relevance)}. Use 0 for a document that does not answer its query and 1 "
            "(or 1 to 3, graded) for one that does."
        )
    if relevances and not any_relevant:
        quoted = ", ".join(repr(query) for query in queries)
        problems.append(
            f"No query has a relevant document: every relevance is 0 (e.g. the queries {quoted}). "
            "A reranker learns to put relevant documents first; mark the documents that answer "
            "each query with relevance 1 (or 1 to 3, graded)."
        )
    elif len(relevances) == 1:
        problems.append(
            f"Every document has relevance {next(iter(relevances)):g}, so there is no order to "
            "learn. Add documents that do not answer their query, with relevance 0."
        )
    return problems


def _is_relevance(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf
