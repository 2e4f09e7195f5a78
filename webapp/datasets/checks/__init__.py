"""The data checks: each family's checks/<name>.py refuses rows it cannot train on, in pure Python."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path

from worker.families import FAMILIES


def problems(task: str, rows_path: Path) -> list[str]:
    """What makes these rows unusable for `task` (empty when they can be trained on)."""
    check = importlib.import_module(FAMILIES[task].checks_module).check
    return check(_read_rows(rows_path))


def is_text(value: object) -> bool:
    """Whether a row's value is text with something in it."""
    return isinstance(value, str) and bool(value.strip())


def quote(text: str, limit: int = 60) -> str:
    """A value of the user's row as a problem message shows it: quoted, cut at `limit` characters."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _read_rows(path: Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
