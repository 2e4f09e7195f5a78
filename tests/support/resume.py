"""Interrupt a recipe after a checkpoint and run it again: what every recipe's resume test checks."""

from __future__ import annotations

import pytest

from worker.errors import Cancelled
from worker.events import Reporter


class StopAfter(Reporter):
    """A reporter that asks the recipe to stop once step `step` is reported, as a cancel or a
    lost lease does; the run ends after that step with Cancelled."""

    def __init__(self, step: int):
        super().__init__()
        self.stop_step = step

    def metric(self, step, **values):
        super().metric(step, **values)
        if step >= self.stop_step:
            self.stop_requested.set()


def interrupt_and_resume(run, spec, stop_after: int) -> tuple[list[dict], list[dict], dict]:
    """The events of a run stopped after step `stop_after`, and the events and result of a second
    run of the same spec."""
    first = StopAfter(stop_after)
    with pytest.raises(Cancelled):
        run(spec, first)
    second = Reporter()
    result = run(spec, second)
    return first.events, second.events, result


def metric_steps(events: list[dict]) -> list[int]:
    return [event["step"] for event in events if event["kind"] == "metric"]


def recorded(first: list[dict], second: list[dict]) -> list[dict]:
    """What the job's history holds: the worker drops replayed steps (webapp.jobs.tasks.JobRunner.deliver)."""
    until = {kind: max(e["step"] for e in first if e["kind"] == kind) for kind in ("metric", "eval")}
    return first + [e for e in second if e["kind"] not in until or e["step"] > until[e["kind"]]]


def assert_resumed(first: list[dict], second: list[dict], checkpoint: int, total: int) -> None:
    messages = [event.get("message", "") for event in second if event["kind"] == "log"]
    assert f"Resuming from the checkpoint at step {checkpoint}." in messages
    assert metric_steps(second) == list(range(checkpoint + 1, total + 1)), "it did not continue from the checkpoint"
    assert not any(e.get("baseline") for e in second if e["kind"] == "eval"), "the baseline was measured again"
    history = recorded(first, second)
    assert metric_steps(history) == list(range(1, total + 1)), "the loss curve has a gap or a repeated step"
    assert sum(1 for e in history if e["kind"] == "eval" and e.get("baseline")) == 1


def baseline(events: list[dict]) -> dict:
    """The step-0 evaluation's values (without the event's own fields)."""
    event = next(e for e in events if e["kind"] == "eval" and e.get("baseline"))
    return {key: value for key, value in event.items() if key not in ("kind", "step", "t", "baseline")}


def assert_same_losses(resumed: list[dict], uninterrupted: list[dict], after: int) -> None:
    """The resumed steps repeat the uninterrupted run's: same weights, optimizer, schedule, RNG and data order."""

    def losses(events):
        return {e["step"]: e["loss"] for e in events if e["kind"] == "metric" and e["step"] > after}

    assert losses(resumed) == pytest.approx(losses(uninterrupted), rel=1e-4, abs=1e-6)
