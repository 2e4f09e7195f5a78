"""The seeded and stratified splits (worker/rows.py) never put one input on both sides: property
tests over rows with repeated inputs (whitespace variants included), and the quality report's
copy of the splits on row numbers (worker/quality.py) holds out the same rows."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import quality
from worker.families import FAMILIES
from worker.rows import (
    INPUT_FIELDS,
    held_count,
    hold_out_queries,
    normalised,
    row_input,
    split_rows,
    stratified_split,
    validation_split,
)

WORDS = st.sampled_from(["Paris", "paris", "the capital", "of", "France?", "x"])
SPACE = st.sampled_from([" ", "  ", "\t", "\n", " \n "])


@st.composite
def texts(draw) -> str:
    """A few words joined and padded by random whitespace: variants of one input."""
    words = draw(st.lists(WORDS, min_size=1, max_size=3))
    joined = "".join(word + draw(SPACE) for word in words)
    return draw(st.sampled_from(["", " ", "\n"])) + joined


@st.composite
def sft_rows(draw) -> list[dict]:
    """Rows of a few distinct inputs, each written in several whitespace variants, some with a
    system prompt, some as a conversation."""
    pool = draw(st.lists(texts(), min_size=1, max_size=6))
    rows = []
    for n in range(draw(st.integers(0, 40))):
        text = draw(st.sampled_from(pool))
        shape = draw(st.sampled_from(["flat", "system", "messages"]))
        if shape == "messages":
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": f"reply {n}"}]
            rows.append({"messages": messages, "n": n})
        else:
            rows.append({"instruction": text, "response": f"answer {n}", "n": n}
                        | ({"system": "Be brief. "} if shape == "system" else {}))
    return rows


def inputs(rows: list[dict]) -> set[str]:
    return {row_input(row) for row in rows}


@settings(max_examples=150, deadline=None)
@given(rows=sft_rows(), fraction=st.floats(0, 0.95), seed=st.integers(0, 2**32))
def test_no_held_out_input_is_trained_on_and_every_row_is_on_one_side(rows, fraction, seed):
    train, held = split_rows(rows, fraction, seed)
    assert sorted(row["n"] for row in train + held) == list(range(len(rows)))
    assert not inputs(held) & inputs(train)
    if held:
        target = held_count(len(rows), fraction)
        smallest = min(sum(row_input(r) == row_input(row) for r in rows) for row in held)
        assert len(held) <= target or len(inputs(held)) == 1 and len(held) == smallest
        assert train  # something is always left to train on


@settings(max_examples=150, deadline=None)
@given(data=st.data(), fraction=st.floats(0, 0.95), seed=st.integers(0, 2**32))
def test_the_stratified_split_never_leaks_and_keeps_every_label_in_training(data, fraction, seed):
    pool = data.draw(st.lists(texts(), min_size=1, max_size=8))
    labels = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    rows = [
        {"text": data.draw(st.sampled_from(pool)), "label": data.draw(st.sampled_from(labels)), "n": n}
        for n in range(data.draw(st.integers(0, 40)))
    ]
    train, held = stratified_split(rows, fraction, seed)
    assert sorted(row["n"] for row in train + held) == list(range(len(rows)))
    assert not inputs(held) & inputs(train)
    assert {row["label"] for row in train} == {row["label"] for row in rows}
    assert numbers(quality_stratified(rows, fraction, seed)) == sorted(row["n"] for row in held)


@settings(max_examples=100, deadline=None)
@given(rows=sft_rows(), fraction=st.floats(0, 0.95), seed=st.integers(0, 2**32))
def test_the_quality_report_holds_out_the_rows_the_split_holds_out(rows, fraction, seed):
    _, held = split_rows(rows, fraction, seed)
    groups, count = quality.first_appearance_groups(digests(rows))
    assert numbers(quality.grouped_positions(groups, count, fraction, seed)) == sorted(row["n"] for row in held)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), fraction=st.floats(0, 0.95), seed=st.integers(0, 2**32))
def test_held_out_queries_are_never_trained_on_whatever_their_whitespace(data, fraction, seed):
    pool = data.draw(st.lists(texts(), min_size=1, max_size=8))
    rows = [{"query": data.draw(st.sampled_from(pool)), "positive": f"p{n}", "n": n} for n in range(data.draw(st.integers(0, 30)))]
    train, held = hold_out_queries(rows, [row["query"] for row in rows], fraction, seed)
    assert sorted(row["n"] for row in train + held) == list(range(len(rows)))
    assert not {normalised(r["query"]) for r in held} & {normalised(r["query"]) for r in train}


def digests(rows: list[dict]) -> np.ndarray:
    return np.array([quality._digest(row_input(row)) for row in rows], dtype=np.uint64)


def quality_stratified(rows: list[dict], fraction: float, seed: int) -> np.ndarray:
    names = sorted({row["label"] for row in rows})
    labels = np.array([names.index(row["label"]) for row in rows], dtype=np.int64)
    groups, count = quality.first_appearance_groups(digests(rows))
    return quality.stratified_positions(labels, names, groups, count, fraction, seed)


def numbers(positions: np.ndarray) -> list[int]:
    return sorted(positions.tolist())


def test_whitespace_variants_are_one_input_and_case_is_kept():
    assert row_input({"instruction": "  What is\n\nthe   capital?\t"}) == row_input({"instruction": "What is the capital?"})
    assert row_input({"instruction": "Paris"}) != row_input({"instruction": "paris"})
    assert row_input({"instruction": "q", "system": "s"}) != row_input({"instruction": "q"})
    assert row_input({"instruction": "q", "response": "a"}) == row_input({"instruction": "q", "response": "b"})


def test_a_conversations_input_is_everything_but_its_last_assistant_turn():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Weather?"}]
    one = {"messages": [*turns, {"role": "assistant", "content": "Sunny."}], "tools": []}
    other = {"messages": [*turns[:2], {"role": "user", "content": " Weather? "}, {"role": "assistant", "content": "Rain"}]}
    assert row_input(one) == row_input(other) != row_input({"messages": turns[:2] + [turns[0]]})
    assert row_input({"prompt_messages": turns, "chosen": "a"}) == row_input({"prompt_messages": turns, "chosen": "b"})


def test_every_field_named_an_input_is_an_input_of_every_family_that_has_it():
    # row_input reads every family's input fields from any row, so a field that one family reads
    # and another writes (a reply, a label) would split rows with the same input.
    for family in FAMILIES.values():
        assert set(family.fields) & set(INPUT_FIELDS) == set(family.inputs), family.key


def test_with_few_groups_the_split_holds_out_one_group_rather_than_nothing():
    rows = [{"instruction": f"q{n % 5}", "response": "a", "n": n} for n in range(10)]  # each input twice
    train, held = split_rows(rows, 0.1, 3)  # one row wanted, every group has two
    assert len(held) == 2 and len(inputs(held)) == 1 and not inputs(held) & inputs(train)
    same = [{"instruction": "q", "response": str(n)} for n in range(5)]
    assert split_rows(same, 0.5, 3) == (same, [])  # one input: nothing can be held out without a leak


def test_without_repeated_inputs_the_split_is_the_plain_seeded_shuffle():
    import random

    rows = [{"instruction": f"q{n}", "response": "a", "n": n} for n in range(30)]
    order = list(range(30))
    random.Random(5).shuffle(order)
    assert sorted(row["n"] for row in split_rows(rows, 0.2, 5)[1]) == sorted(order[:6])


def test_a_validation_file_can_drop_its_inputs_from_training_and_lists_new_inputs_first():
    rows = [{"instruction": f"q{n}", "response": "a"} for n in range(6)]
    validation = [{"instruction": " q1", "response": "b"}, {"instruction": "new", "response": "c"},
                  {"instruction": "q4\n", "response": "d"}]
    assert validation_split(rows, validation, drop_overlap=False) == (rows, validation)
    train, held = validation_split(rows, validation, drop_overlap=False, new_first=True)
    assert train == rows and [row["instruction"] for row in held] == ["new", " q1", "q4\n"]
    train, held = validation_split(rows, validation, drop_overlap=True, new_first=True)
    assert [row["instruction"] for row in train] == ["q0", "q2", "q3", "q5"] and held == validation
