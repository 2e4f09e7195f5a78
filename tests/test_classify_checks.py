"""The classification data check and the classify / pair sample data (pure Python, no torch)."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from webapp.datasets.checks.classify import MAX_LABELS, check
from webapp.datasets.samples import classify as classify_sample
from webapp.datasets.samples import pair as pair_sample


def rows_with(labels: list[str]) -> list[dict[str, str]]:
    return [{"text": f"row {i}", "label": label} for i, label in enumerate(labels)]


def test_usable_data_has_no_problems():
    assert check(rows_with(["spam", "ham", "spam", "ham"])) == []


def test_unbalanced_labels_and_a_label_on_one_row_are_fine():
    assert check(rows_with(["spam"] * 9 + ["ham"])) == []


def test_it_reports_no_rows():
    assert check([]) == ["The dataset has no rows."]


def test_it_reports_a_single_class():
    assert check(rows_with(["spam"] * 5)) == [
        "The label column has only one class ('spam'); a classifier needs at least two."
    ]


def test_labels_that_differ_only_in_surrounding_spaces_are_one_class():
    assert "only one class ('spam')" in check(rows_with(["spam", " spam", "spam "]))[0]


def test_it_reports_every_label_on_a_single_row():
    (problem,) = check(rows_with(["a", "b", "c"]))
    assert problem.startswith("Every label occurs only once (3 rows, 3 labels)")


def test_it_reports_too_many_labels_and_streams_with_bounded_memory():
    rows = ({"text": "x", "label": str(i % (MAX_LABELS + 5))} for i in range(3 * MAX_LABELS))
    (problem,) = check(rows)  # a generator: read once, never held whole
    assert f"more than {MAX_LABELS} different values" in problem


def test_pair_rows_are_checked_by_their_label():
    rows = [{"text_a": "a claim", "text_b": "a context", "label": label} for label in ("yes", "no", "yes")]
    assert check(rows) == []
    assert "only one class ('yes')" in check(rows[::2])[0]


def test_the_check_and_the_samples_import_no_torch():
    code = (
        "import sys\n"
        "import webapp.datasets.checks.classify, webapp.datasets.samples.classify, webapp.datasets.samples.pair\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("sample", "fields"),
    [(classify_sample, {"text", "label"}), (pair_sample, {"text_a", "text_b", "label"})],
)
def test_the_samples_are_deterministic_distinct_balanced_and_pass_the_check(sample, fields):
    rows = sample.rows()
    assert rows == sample.rows()
    assert 200 <= len(rows) <= 400
    assert all(set(row) == fields and all(isinstance(v, str) and v.strip() for v in row.values()) for row in rows)
    assert len({tuple(row.values()) for row in rows}) == len(rows)
    counts = Counter(row["label"] for row in rows)
    assert len(counts) >= 2 and max(counts.values()) == min(counts.values())
    assert check(rows) == []


def test_in_the_intent_sample_places_and_days_do_not_give_the_tool_away():
    rows = classify_sample.rows()
    for slot in (classify_sample.PLACES, classify_sample.DAYS):
        tools = {row["label"] for row in rows if any(value in row["text"] for value in slot)}
        assert tools == set(classify_sample.TEMPLATES)


def test_every_company_of_the_faithfulness_sample_has_claims_of_both_kinds():
    rows = pair_sample.rows()
    for company in pair_sample.COMPANIES:
        labels = Counter(row["label"] for row in rows if row["text_b"].startswith(f"{company}:"))
        assert labels == {"supported": 6, "unsupported": 6}
        assert all(company in row["text_a"] for row in rows if row["text_b"].startswith(f"{company}:"))
