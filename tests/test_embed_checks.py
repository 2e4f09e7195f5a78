"""The pure-Python check that refuses data an embedding model cannot learn from, and the sample data."""

from webapp.datasets.checks.embed import check
from webapp.datasets.samples import embed as sample


def pairs(count: int) -> list[dict]:
    return [{"query": f"question {i}", "positive": f"answer {i}"} for i in range(count)]


def test_the_sample_data_passes_and_pairs_each_ticket_with_its_article_and_a_hard_negative():
    rows = sample.rows()
    assert check(rows) == []
    assert rows == sample.rows()  # deterministic
    assert len(rows) == 240 and len({row["query"] for row in rows}) == 240
    for row in rows:
        product = row["query"].replace("ticket ", "")
        assert row["positive"] != row["negative"]
        assert row["positive"].split(":")[0] == row["negative"].split(":")[0]  # the same product
        assert row["positive"].split(":")[0] in product


def test_usable_pairs_pass_with_or_without_negatives():
    assert check(pairs(2)) == []
    assert check([{**row, "negative": "unrelated"} for row in pairs(3)]) == []


def test_it_refuses_fewer_than_two_rows():
    assert check([])[0].startswith("The dataset has 0 rows;")
    assert check(pairs(1))[0].startswith("The dataset has 1 row; an embedding model learns")


def test_it_refuses_rows_without_query_or_positive_and_names_them():
    rows = pairs(3) + [{"query": "q"}, {"query": " ", "positive": "p"}, {"positive": 5, "query": "q"}]
    problems = check(rows)
    assert problems == ["3 row(s) have no query or no positive text, e.g. row 4, row 5, row 6."]


def test_it_refuses_data_where_every_positive_copies_its_query():
    rows = [{"query": f"text {i}", "positive": f"text {i} "} for i in range(5)]
    assert check(rows) == [
        "Every positive is a copy of its query, so the model would only learn that a text matches "
        "itself. The positive should be the document that answers the query."
    ]


def test_a_few_positives_that_copy_their_query_are_not_refused():
    assert check(pairs(5) + [{"query": "same", "positive": "same"}]) == []


def test_it_refuses_a_single_query_or_a_single_positive():
    same_query = [{"query": "q", "positive": f"p{i}"} for i in range(3)]
    assert check(same_query) == [
        "Every row has the same query ('q'); the model needs different queries to learn which "
        "document belongs to which."
    ]
    same_positive = [{"query": f"q{i}", "positive": "p"} for i in range(3)]
    assert check(same_positive)[0].startswith("Every row has the same positive ('p')")


def test_it_reads_the_rows_once_as_a_stream():
    def stream():
        yield from pairs(5000)

    assert check(stream()) == []
