"""The pure-Python check that refuses unusable KTO data before a job is queued, and the one
reading of a label it shares with the recipe."""

import pytest

from webapp.datasets.checks.kto import check
from webapp.datasets.samples.kto import rows as sample_rows
from worker.desirability import is_desirable


def row(n: int, label: str = "true") -> dict:
    return {"prompt": f"Question {n}?", "completion": f"Answer: {n}.", "label": label}


def mixed(count: int = 6) -> list[dict]:
    return [row(n, "true" if n % 2 else "false") for n in range(count)]


@pytest.mark.parametrize("label", ["true", "True", " TRUE ", "1", "desirable", "Desirable", "good", "yes", "YES"])
def test_it_reads_a_desirable_label(label):
    assert is_desirable(label) is True


@pytest.mark.parametrize("label", ["false", "False", "0", "undesirable", "UNDESIRABLE", "bad", "no", " No"])
def test_it_reads_an_undesirable_label(label):
    assert is_desirable(label) is False


@pytest.mark.parametrize("label", ["maybe", "2", "-1", "1.0", "truthy", "", "yes!", "not good"])
def test_it_reads_anything_else_as_neither(label):
    assert is_desirable(label) is None


def test_it_accepts_the_sample_data_with_both_kinds_half_and_half():
    rows = sample_rows()
    assert check(rows) == []
    assert sum(is_desirable(r["label"]) for r in rows) * 2 == len(rows) == 300
    assert rows == sample_rows()  # deterministic


def test_it_accepts_every_spelling_of_the_two_kinds():
    labels = ["true", "false", "1", "0", "Desirable", "undesirable", "good", "BAD", "yes", "no"]
    assert check(row(n, label) for n, label in enumerate(labels)) == []


def test_it_refuses_an_empty_file():
    assert check([]) == ["The dataset has no rows."]


def test_it_refuses_labels_that_say_neither_kind_naming_the_rows_and_values():
    rows = mixed() + [row(7, "maybe"), row(8, "3"), row(9, "  perhaps "), row(10, "unsure")]
    (problem,) = check(rows)
    assert problem.startswith(
        "4 row(s) have a label that says neither desirable nor undesirable, e.g. "
        "row 7 ('maybe'), row 8 ('3'), row 9 ('perhaps')."
    )
    assert "true/false, 1/0, desirable/undesirable, good/bad or yes/no" in problem


def test_it_refuses_a_file_with_only_desirable_rows():
    (problem,) = check(row(n, "true") for n in range(5))
    assert problem.startswith("Every labelled row is desirable. KTO learns from completions of both kinds")
    assert "instruction tuning" in problem


def test_it_refuses_a_file_with_only_undesirable_rows():
    (problem,) = check(row(n, label) for n, label in enumerate(["false", "0", "bad"]))
    assert problem.startswith("Every labelled row is undesirable.")


def test_it_refuses_rows_without_a_prompt_completion_or_label():
    rows = mixed() + [{"prompt": "Q?", "completion": "A."}, {"prompt": "Q?", "completion": " ", "label": "true"}]
    assert check(rows) == ["2 row(s) lack a prompt, a completion or a label, e.g. row 7, row 8."]


def test_a_multi_turn_prompt_stands_for_the_prompt():
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Sum 2 and 2?"},
    ]
    rows = mixed() + [{"prompt_messages": turns, "completion": "Answer: 4.", "label": "true"}]
    assert check(rows) == []
    assert check(mixed() + [{"prompt_messages": [], "completion": "A.", "label": "true"}]) == [
        "1 row(s) lack a prompt, a completion or a label, e.g. row 7."
    ]


def test_it_streams_over_the_rows():
    assert check(r for r in mixed()) == []
