"""Sample data: each family's samples/<name>.py makes rows that a fine-tune visibly learns from;
EXTRA names more sample sets of a family (tool selection is instruction tuning on conversations)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from worker.families import FAMILIES


@dataclass(frozen=True)
class Extra:
    task: str
    module: str
    name: str
    row: str


EXTRA = {
    "tools": Extra("sft", "webapp.datasets.samples.tools", "Tool selection",
                   "request → a call to one of 12 tools (instruction tuning on conversations)"),
}


def sample_task(key: str) -> str | None:
    """The task of sample set `key` (a family key or an EXTRA key); None for no such set."""
    return key if key in FAMILIES else EXTRA[key].task if key in EXTRA else None


def sample_name(key: str) -> str:
    return FAMILIES[key].name if key in FAMILIES else EXTRA[key].name


def sample_rows(key: str) -> list[dict]:
    module = FAMILIES[key].samples_module if key in FAMILIES else EXTRA[key].module
    return importlib.import_module(module).rows()
