"""The task families a dataset can be for: what a row holds, which base models can learn it,
the pure-Python check that refuses unusable data before anything is queued, and sample data."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Task:
    key: str
    name: str
    row: str
    """What one row holds, in the user's words."""
    base_kinds: tuple[str, ...]
    """Catalog kinds (worker.catalog) that can serve the task."""
    module: str
    """The name of the check module (webapp/datasets/checks) and the sample module (samples/)."""


TASKS: dict[str, Task] = {
    t.key: t
    for t in (
        Task("sft", "Instruction tuning", "instruction → response (also query rewriting)", ("causal-lm",), "sft"),
        Task("classify", "Classification", "text → label (intent, topic, tool selection)", ("encoder", "causal-lm"),
             "classify"),
        Task("pair", "Pair classification", "text_a + text_b → label (faithfulness, NLI)", ("encoder", "causal-lm"),
             "pair"),
        Task("rerank", "Reranker", "query + document → relevance (0/1 or graded)", ("encoder",), "rerank"),
        Task("embed", "Embedding model", "query → positive (+ optional negative)", ("encoder",), "embed"),
        Task("dpo", "Preference tuning (DPO)", "prompt → chosen vs rejected", ("causal-lm",), "dpo"),
    )
}
CHECK_MODULES = {"pair": "classify"}  # pair rows are checked like classification rows


def choices() -> list[tuple[str, str]]:
    return [(t.key, f"{t.name}: {t.row}") for t in TASKS.values()]


def read_rows(path: Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def problems(task: str, rows_path: Path) -> list[str]:
    """What makes these rows unusable for `task` (empty when they can be trained on)."""
    module = CHECK_MODULES.get(task, TASKS[task].module)
    check = importlib.import_module(f"webapp.datasets.checks.{module}").check
    return check(read_rows(rows_path))


def sample_rows(task: str) -> list[dict]:
    return importlib.import_module(f"webapp.datasets.samples.{TASKS[task].module}").rows()
