"""The pure-Python check that refuses unusable preference (DPO) data before a job is queued."""

from webapp.datasets.checks.dpo import check
from webapp.datasets.samples.dpo import rows as sample_rows


def pair(n: int, chosen: str | None = None, rejected: str | None = None) -> dict:
    return {"prompt": f"Question {n}?", "chosen": chosen or f"Answer: {n}.", "rejected": rejected or f"Hmm, {n} maybe."}


def test_it_accepts_the_sample_data():
    assert check(sample_rows()) == []


def test_it_accepts_a_few_pairs_with_the_same_answers():
    rows = [pair(n) for n in range(10)] + [pair(n, chosen="Same.", rejected="Same.") for n in range(3)]
    assert check(rows) == []


def test_it_refuses_an_empty_file():
    assert check([]) == ["The dataset has no rows."]


def test_it_refuses_data_where_every_pair_has_the_same_answers():
    rows = [pair(n, chosen=f"Answer: {n}.", rejected=f"Answer: {n}.  ") for n in range(5)]
    (problem,) = check(rows)
    assert problem.startswith("Every row has the same chosen and rejected answer")
    assert "row 1 ('Answer: 0.'), row 2 ('Answer: 1.'), row 3 ('Answer: 2.')." in problem
    assert "different columns" in problem


def test_it_refuses_data_where_most_pairs_have_the_same_answers_and_counts_them():
    rows = [pair(n) for n in range(4)] + [pair(n, chosen="Same.", rejected="Same.") for n in range(6)]
    (problem,) = check(rows)
    assert problem.startswith("6 of 10 rows have the same chosen and rejected answer, e.g. row 5 ('Same.')")


def test_it_refuses_rows_without_an_answer():
    rows = [pair(1), {"prompt": "Q?", "chosen": "A.", "rejected": "  "}, {"prompt": "Q?", "chosen": "A."}]
    assert check(rows) == ["2 row(s) lack a prompt, a chosen or a rejected answer, e.g. row 2, row 3."]


def test_it_streams_over_the_rows():
    assert check(pair(n) for n in range(3)) == []
