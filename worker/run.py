"""Run one fine-tune from plain Python: ``python -m worker.run spec.json``.

Each event is printed as one JSON line on stdout. Ctrl-C asks the recipe to stop after the
current step (a second Ctrl-C interrupts at once). Exit status: 0 succeeded, 1 failed with a
user error (the message says what to fix), 130 cancelled.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.spec import TrainSpec

TRAINING_IMPORTS = threading.Lock()
"""transformers' lazy imports are not thread-safe: a job that arrived while the worker's
capabilities thread was still importing the recipes failed with "cannot import name
'TrainerCallback' from 'transformers'". Whoever imports the training modules holds this lock."""


def load_recipe(task: str) -> ModuleType:
    """The recipe module of a task family (importing torch and transformers the first time)."""
    with TRAINING_IMPORTS:
        return importlib.import_module(FAMILIES[task].recipe)


def run_spec(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    """Run the recipe for spec.task and return its result."""
    return load_recipe(spec.task).run(spec, reporter)


def print_events(batch: list[dict[str, Any]]) -> None:
    for event in batch:
        print(json.dumps(event), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m worker.run spec.json", file=sys.stderr)
        return 2
    spec = TrainSpec.from_json(Path(argv[0]).read_text())
    with Reporter(sink=print_events) as reporter:
        _stop_on_first_interrupt(reporter)
        try:
            result = run_spec(spec, reporter)
        except UserError as exc:
            reporter.state("failed", message=str(exc))
            return 1
        except Cancelled as exc:
            reporter.state("cancelled", message=str(exc))
            return 130
        reporter.state("succeeded", message=json.dumps(result))
    return 0


def _stop_on_first_interrupt(reporter: Reporter) -> None:
    def handler(signum, frame):
        reporter.stop_requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
