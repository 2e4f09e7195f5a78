"""The pure-Python check that refuses data a reranker cannot learn from, and the sample data."""

from webapp.datasets.checks.rerank import check
from webapp.datasets.samples import rerank as sample


def rows_of(query: str, relevances: list) -> list[dict]:
    return [{"query": query, "document": f"{query} doc {i}", "relevance": rel} for i, rel in enumerate(relevances)]


def test_the_sample_data_passes_and_gives_each_query_one_relevant_document_among_six():
    rows = sample.rows()
    assert check(rows) == []
    assert rows == sample.rows()  # deterministic
    queries = {row["query"] for row in rows}
    assert len(rows) == 576 and len(queries) == 96
    for query in queries:
        relevances = [row["relevance"] for row in rows if row["query"] == query]
        assert sorted(relevances) == [0.0] * 5 + [1.0]


def test_graded_data_with_some_queries_lacking_a_relevant_document_passes():
    assert check(rows_of("a", [0, 3, 1.5]) + rows_of("b", [0, 0])) == []


def test_it_refuses_data_where_no_query_has_a_relevant_document_and_quotes_some():
    problems = check(rows_of("alpha", [0, 0]) + rows_of("beta", [0]) + rows_of("gamma", [0]) + rows_of("delta", [0]))
    assert len(problems) == 1
    assert problems[0].startswith("No query has a relevant document")
    assert "'alpha', 'beta', 'gamma'" in problems[0] and "delta" not in problems[0]


def test_it_refuses_data_where_every_document_has_the_same_relevance():
    assert check(rows_of("a", [1, 1]) + rows_of("b", [1])) == [
        "Every document has relevance 1, so there is no order to learn. Add documents that do not "
        "answer their query, with relevance 0."
    ]


def test_it_refuses_relevances_that_are_not_numbers_of_at_least_0_and_names_the_rows():
    rows = rows_of("a", [0, 1, -1, "high", True, None, float("nan"), 2])
    problems = check(rows)
    assert len(problems) == 1
    assert problems[0].startswith("5 row(s) have a relevance that is not a number of at least 0")
    assert "row 3 (-1), row 4 ('high'), row 5 (True)" in problems[0]


def test_it_reports_an_empty_dataset():
    assert check([]) == ["The dataset has no rows."]


def test_it_reads_the_rows_once_as_a_stream():
    def stream():
        yield from rows_of("a", [0, 1]) * 1000

    assert check(stream()) == []
