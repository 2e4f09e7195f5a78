"""One micro-batch per CPU core: how a training step uses every core of a CPU worker.

A small model's step on a CPU is thousands of modest operations (matmuls of a few hundred rows,
norms, activations, attention on ~100 tokens). Spread over two cores each of them gains little,
where large matmuls gain almost twice (docs/performance.md). Cut the batch into one micro-batch
per core instead, and run each micro-batch's forward and backward pass on a thread of its own
with one core's worth of torch threads: every operation runs at its single-core speed and all
cores stay busy (the bench's figures: docs/performance.md).

The gradients are the batch's: each micro-batch's loss is its summed token losses divided by
the token count of the whole batch, and autograd adds the micro-batches' parameter gradients
into the same `.grad` (under a lock per parameter; a sum of two terms is the same in either
order, so the result does not depend on which thread finishes first). Rows are dealt to the
micro-batches in turn, so that in a length-grouped batch each gets a similar share of tokens,
and each micro-batch is cut to its own longest row.

Dropout draws its masks from a generator of the micro-batch's own (seeded from the global
generator, in order, before the threads start), so a job gives the same numbers every time it
runs, and after a resume, whichever thread runs first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Batch = dict[str, Any]

_local = threading.local()  # .generator: the dropout generator of the micro-batch this thread runs


def plan(rows: int, device: torch.device) -> tuple[int, int]:
    """(micro-batches, torch threads for each) for a batch of `rows` rows on `device`: one
    micro-batch per torch thread on a CPU with several, at least one row each; (1, threads)
    means the batch runs whole."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or rows < 2:
        return 1, threads
    parts = min(rows, threads)
    return parts, threads // parts


def split(batch: Batch, parts: int, width_key: str = "attention_mask") -> list[Batch]:
    """`batch` (tensors of one row per item, padded on the right) dealt into `parts` micro-batches
    of rows i, i + parts, i + 2·parts, …; each cut to the longest row it holds (per `width_key`)."""
    micro = []
    for first in range(parts):
        rows = {key: value[first::parts] for key, value in batch.items()}
        width = int(rows[width_key].sum(dim=1).max())
        micro.append({key: value[:, :width] if value.dim() == 2 else value for key, value in rows.items()})
    return micro


def run(step: Callable[[Batch], T], micro_batches: Sequence[Batch], threads_each: int) -> list[T]:
    """step(micro_batch) for each micro-batch, each on a thread of its own with `threads_each`
    torch threads; dropout in the step draws from a seeded generator of the micro-batch's own."""
    seeds = torch.randint(2**62, (len(micro_batches),)).tolist()  # from the global generator, in order
    pool = _pool(len(micro_batches), threads_each)
    main_threads = torch.get_num_threads()
    try:
        futures = [pool.submit(_seeded, step, batch, seed) for batch, seed in zip(micro_batches, seeds, strict=True)]
        wait(futures)  # when one fails (out of memory, say), the others still finish before it is raised
        return [future.result() for future in futures]
    finally:
        # The pool's threads each set one core's worth of torch threads; restore the process-wide
        # default that threads started later inherit.
        torch.set_num_threads(main_threads)


def _seeded(step: Callable[[Batch], T], batch: Batch, seed: int) -> T:
    _local.generator = torch.Generator().manual_seed(seed)
    try:
        return step(batch)
    finally:
        _local.generator = None


@cache
def _pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    # Long-lived threads: each keeps its own OpenMP thread team from step to step and job to job.
    return ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="micro-batch",
        initializer=torch.set_num_threads,
        initargs=(threads_each,),
    )


class MicroBatchDropout(torch.nn.Dropout):
    """nn.Dropout that, inside run(), draws its mask from the micro-batch's own generator (the
    global generator is shared by the threads, so the order of their draws would vary)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generator = getattr(_local, "generator", None)
        if generator is None or not self.training or self.p == 0:
            return super().forward(x)
        keep_scaled = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator).div_(1 - self.p)
        return x * keep_scaled


def use_micro_batch_dropout(model: torch.nn.Module) -> None:
    """Make every nn.Dropout in `model` a MicroBatchDropout (the same p; in place)."""
    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.__class__ = MicroBatchDropout
