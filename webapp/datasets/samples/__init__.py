"""Sample data: each family's samples/<name>.py makes rows that a fine-tune visibly learns from."""

from __future__ import annotations

import importlib

from worker.families import FAMILIES


def sample_rows(task: str) -> list[dict]:
    return importlib.import_module(FAMILIES[task].samples_module).rows()
