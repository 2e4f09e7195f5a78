"""The pure-Python check that refuses unusable instruction-tuning (SFT) data before a job is queued."""

from webapp.datasets.checks.sft import check
from webapp.datasets.samples.sft import rows as sample_rows


def test_it_accepts_the_sample_data():
    assert check(sample_rows()) == []


def test_it_accepts_repeated_instructions_with_different_responses():
    assert check([{"instruction": "Hi", "response": "Hello."}, {"instruction": "Hi", "response": "Hey."}]) == []


def test_it_accepts_a_single_row():
    assert check([{"instruction": "Hi", "response": "Hello."}]) == []


def test_it_refuses_an_empty_file():
    assert check([]) == ["The dataset has no rows."]


def test_it_refuses_data_where_every_response_is_the_same():
    rows = ({"instruction": f"Question {n}", "response": "No idea. " if n % 2 else "No idea."} for n in range(4))
    (problem,) = check(rows)
    assert problem.startswith("Every row has the same response ('No idea.')")


def test_it_refuses_rows_without_instruction_or_response():
    rows = [
        {"instruction": "Hi", "response": "Hello."},
        {"instruction": "", "response": "Hello."},
        {"instruction": "Hi"},
        {"instruction": "Hi", "response": 3},
    ]
    assert check(rows) == ["3 row(s) have no instruction or no response text, e.g. row 2, row 3, row 4."]
