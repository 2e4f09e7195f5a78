"""The Trainer's side of checkpoints (worker/checkpoints.py): a callback that saves on the step
and time schedule, writes the resolved spec into the folder, signs and prunes, and keeps the
weights of each evaluation during training for download (worker.snapshots); and the resume of
LoRA checkpoints for the sentence-transformers trainers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from worker.checkpoints import PREFIX, SPEC, prune, sign
from worker.events import Reporter
from worker.snapshots import Snapshots
from worker.spec import TrainSpec

FLUSH_SECONDS = 60  # how long a checkpoint waits for the events before it to be recorded


class AdapterResume:
    """Mixin for sentence-transformers' trainers, whose resume rebuilds the model from the
    checkpoint folder and copies its weights over: with LoRA the rebuilt model's parameter names
    differ from the peft-wrapped one's. Load the adapter weights in place instead."""

    def _load_from_checkpoint(self, checkpoint_path: str, *args, **kwargs) -> None:
        network = self.model[0].model
        if not hasattr(network, "peft_config"):
            return super()._load_from_checkpoint(checkpoint_path, *args, **kwargs)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(Path(checkpoint_path) / "adapter_model.safetensors")
        loaded = set_peft_model_state_dict(network, weights)
        if loaded.unexpected_keys:
            raise RuntimeError(
                f"{checkpoint_path} holds adapter weights this model lacks: {loaded.unexpected_keys[:3]}"
            )
        return None


class Checkpointing(TrainerCallback):
    """Saves on the step schedule and at least every spec.checkpoint_minutes; signs and prunes.

    The best checkpoint is judged by `best_by`, a value of the recipe's latest eval event during
    training (lower is better unless `higher_is_better`).
    """

    def __init__(self, spec: TrainSpec, reporter: Reporter, best_by: str = "eval_loss", higher_is_better: bool = False):
        self.spec = spec
        self.reporter = reporter
        self.best_by = best_by
        self.sign = -1.0 if higher_is_better else 1.0
        self.last_save = time.monotonic()
        self.snapshots = Snapshots(spec)
        self.scanned = 0  # the reporter's events read for evaluations so far
        self.evaluation: dict | None = None  # the latest evaluation during training not yet kept

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last_save >= self.spec.checkpoint_minutes * 60:
            control.should_save = True

    # An evaluation during training is reported from on_log or on_evaluate, by a callback before
    # or after this one: its weights are kept on the first of these calls after it, while the
    # model is still as evaluated (the next update comes after on_step_begin).
    def on_log(self, args, state, control, model=None, **kwargs):
        self.keep_evaluated(state.global_step, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.keep_evaluated(state.global_step, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.keep_evaluated(state.global_step, model)

    def keep_evaluated(self, step: int, model) -> None:
        """Keep the weights of the evaluation reported at `step`, if it was (worker.snapshots)."""
        events = self.reporter.events
        for event in events[self.scanned :]:
            if event["kind"] == "eval" and event["step"] > 0 and not event.get("baseline") and not event.get("final"):
                self.evaluation = event
        self.scanned = len(events)
        if self.evaluation is None or model is None or self.evaluation["step"] > step:
            return
        if self.evaluation["step"] == step:  # else the model has moved on since: too late
            self.snapshots.take(model, step, self.evaluation)
        self.evaluation = None

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if not folder.is_dir():
            return
        if self.resumable(state):
            (folder / SPEC).write_text(self.spec.to_json() + "\n")
            sign(folder, self.score(state.global_step))
            prune(Path(args.output_dir))
            self.reporter.log(f"Checkpoint saved at step {state.global_step}.", step=state.global_step)
        else:
            shutil.rmtree(folder, ignore_errors=True)

    def resumable(self, state) -> bool:
        """Whether a checkpoint at this step may be resumed from (an unsigned one never is).

        Not at the last step: the Trainer resumed there trains one step past the end (the model
        is exported right after anyway). Not once the job is to stop (a cancel, a lost lease).
        And only once every event up to this step is recorded, so a resumed attempt starts where
        the job's history ends: no gap in the curve, whatever happened to the events in flight.
        """
        if state.global_step >= state.max_steps:
            return False
        return self.reporter.flush(timeout=FLUSH_SECONDS) and not self.reporter.stop_requested.is_set()

    def score(self, step: int) -> float | None:
        """The checkpoint's held-out score (lower is better): from the latest evaluation during training."""
        for event in reversed(self.reporter.events):
            if event["kind"] == "eval" and 0 < event["step"] <= step and self.best_by in event:
                return self.sign * float(event[self.best_by])
        return None
