"""Batches of rows of similar length, in a seeded random order: little padding, no sawtooth.

transformers' LengthGroupedSampler sorts "megabatches" of min(rows / 32, 50) batches each, so a
small dataset gets tiny groups (24 rows for 104) and a quarter of every batch is padding, and the
loss curve saw-tooths from long to short rows in every group. Here each chunk of up to
CHUNK_BATCHES batches is sorted by length as a whole and cut into batches, and then the order of
all the epoch's batches is shuffled. The batch holding the longest row goes first, so a job that
does not fit in memory fails at its first step rather than its last; a short batch (the rows left
over) goes last.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

CHUNK_BATCHES = 50
"""Batches sorted together. Larger chunks pad less; every chunk still mixes rows from the whole file."""


class LengthGroupedBatches(Sampler[int]):
    """Row indices, batch after batch: every row exactly once per epoch, the same order for a seed and epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, chunk_batches: int = CHUNK_BATCHES):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.chunk_rows = batch_size * chunk_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (and when it resumes mid-epoch): a new order per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.chunk_rows):
            chunk = sorted(order[start : start + self.chunk_rows], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # The DataLoader cuts the index stream every batch_size rows: only the last batch may be short.
        full = [batch for batch in batches if len(batch) == self.batch_size]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        rng.shuffle(full)
        if full:
            longest = max(range(len(full)), key=lambda b: max(self.lengths[i] for i in full[b]))
            full.insert(0, full.pop(longest))
        return full + short
