"""worker.batching.LengthGroupedBatches: every row once per epoch, little padding, a seeded order."""

import random

import pytest

from worker.batching import LengthGroupedBatches


def lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(256, max(20, round(rng.lognormvariate(4.5, 0.5)))) for _ in range(count)]


def cut(order: list[int], batch_size: int) -> list[list[int]]:
    """The batches the DataLoader makes: the index stream cut every batch_size rows."""
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding(batches: list[list[int]], sizes: list[int]) -> float:
    real = sum(sizes[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(sizes[i] for i in batch) for batch in batches)
    return 1 - real / padded


@pytest.mark.parametrize(("rows", "batch_size", "chunk_batches"), [(104, 8, 50), (101, 8, 50), (1000, 8, 4), (3, 8, 50)])
def test_every_row_comes_exactly_once_per_epoch(rows, batch_size, chunk_batches):
    sampler = LengthGroupedBatches(lengths(rows), batch_size, seed=42, chunk_batches=chunk_batches)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(rows)) and len(sampler) == rows


def test_the_order_is_the_same_for_a_seed_and_epoch_and_changes_with_either():
    sizes = lengths(300)
    first, again = LengthGroupedBatches(sizes, 8, seed=1), LengthGroupedBatches(sizes, 8, seed=1)
    assert list(first) == list(again)
    other_seed = LengthGroupedBatches(sizes, 8, seed=2)
    assert list(other_seed) != list(first)
    again.set_epoch(1)
    assert list(again) != list(first)


def test_batches_hold_rows_of_similar_length_far_better_than_random_batches():
    sizes = lengths(2000)
    grouped = cut(list(LengthGroupedBatches(sizes, 8, seed=42)), 8)
    shuffled = list(range(len(sizes)))
    random.Random(42).shuffle(shuffled)
    assert padding(grouped, sizes) < 0.05 < 0.25 < padding(cut(shuffled, 8), sizes)


def test_a_small_dataset_is_sorted_as_a_whole():
    # transformers' own sampler sorts groups of 24 rows here and leaves about a quarter padding.
    sizes = lengths(104)
    assert padding(cut(list(LengthGroupedBatches(sizes, 8, seed=42)), 8), sizes) < 0.10


def test_the_longest_row_is_in_the_first_batch_and_only_the_last_batch_is_short():
    sizes = lengths(101)
    for seed in range(5):
        batches = cut(list(LengthGroupedBatches(sizes, 8, seed=seed)), 8)
        assert max(sizes) == max(sizes[i] for i in batches[0])
        assert [len(batch) for batch in batches] == [8] * 12 + [5]


def test_the_order_of_batches_is_shuffled_not_longest_to_shortest():
    sizes = lengths(400)
    batches = cut(list(LengthGroupedBatches(sizes, 8, seed=42)), 8)
    widths = [max(sizes[i] for i in batch) for batch in batches[1:]]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)
