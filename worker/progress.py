"""Trainer events → reporter events, the same for every recipe; a requested stop ends training
after the current step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from worker.events import Reporter

METRIC_KEYS = {"learning_rate": "learning_rate", "grad_norm": "grad_norm"}
"""Trainer log key → metric event key, for the values reported with each step's loss."""


class ReportProgress(TrainerCallback):
    """Each step's loss as a metric event (with the values named by `metric_keys`).

    `evaluate`, when given, is the recipe's own held-out evaluation (it returns the eval event's
    values): it runs every `eval_every` steps, after that step's loss as the Trainer's own
    evaluation would. The last step is left to the recipe (final=True), and a stopping run is
    not evaluated at all.
    """

    def __init__(
        self,
        reporter: Reporter,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        eval_every: int = 1,
        metric_keys: dict[str, str] = METRIC_KEYS,
    ):
        self.reporter = reporter
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.metric_keys = metric_keys
        self.last_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter.state("training")

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter.stop_requested.is_set():
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        values = {name: float(logs[key]) for key, name in self.metric_keys.items() if key in logs}
        if state.num_input_tokens_seen:  # counted where a recipe asks the Trainer to (sft, classify)
            values["tokens"] = int(state.num_input_tokens_seen)
        step = state.global_step
        self.reporter.metric(
            step, loss=self.last_loss, total_steps=state.max_steps, epoch=round(float(state.epoch or 0), 4), **values
        )
        if self.evaluate and step % self.eval_every == 0 and not control.should_training_stop:
            self.reporter.eval(step, **self.evaluate())


def report_baseline(reporter: Reporter, evaluate: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """The untouched model's held-out metrics, reported as step 0's baseline ({} when nothing is
    held out)."""
    if evaluate is None:
        return {}
    metrics = evaluate()
    reporter.eval(0, baseline=True, **metrics)
    return metrics
