"""The model as it was at each evaluation, so that a user can download the checkpoint with the
best trade-off between task gain and forgetting, not only the last.

At every evaluation during training (worker.checkpointing.Checkpointing notices the eval event)
the trained parameters are saved: those with requires_grad, so a LoRA adapter, a head, or every
weight of a full fine-tune; safetensors, `evaluated/step-<N>.safetensors` in the attempt's
folder, with that evaluation's values beside it (`step-<N>.json`). Only the evaluations on the
front are kept (worker.tradeoff: no other is as good on the primary metric and on forgetting and
better on one), at most MAX_KEPT of them (MAX_KEPT_FULL of a full fine-tune, each the whole
model): every other one is a worse deal than a kept one.

When the job exports, each kept evaluation still on the front with the final model is written by
the recipe's own export (its weights loaded into the model, or into a copy of it where the export
merges LoRA into the weights), zipped beside the final artifact as
`<artifact>-step-<N>.zip`, and listed in the result's `checkpoints` with its metrics. A resumed
attempt brings the kept files of the attempt before it along (worker.attempts).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worker import tradeoff
from worker.artifacts import artifact_name, zip_dir
from worker.checkpoints import EVALUATED as FOLDER
from worker.families import FAMILIES
from worker.spec import TrainSpec

MAX_KEPT = 6
"""Kept evaluations at most of an adapter or a head (each a few MB)."""
MAX_KEPT_FULL = 3
"""Of a full fine-tune, each of which is the whole model."""


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes, by name, copied to the CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put `weights` (trained_weights of this model) back into it."""
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise RuntimeError(f"the kept weights name parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Snapshots:
    """The kept evaluations of one attempt's folder."""

    def __init__(self, spec: TrainSpec):
        self.spec = spec
        self.folder = Path(spec.output_dir) / FOLDER
        self.metric = FAMILIES[spec.task].primary_metric
        self.most = MAX_KEPT_FULL if spec.method == "full" else MAX_KEPT

    def take(self, model: torch.nn.Module, step: int, values: dict[str, Any]) -> None:
        """Keep the model's trained weights as evaluated at `step` (if that evaluation is on the
        front of those kept), and drop the kept ones it beats."""
        entry = numbers(values)
        if not tradeoff.points([(step, entry)], self.metric):
            return  # without the task metric and forgetting it cannot be placed on the trade-off
        kept = [(s, v) for s, v in self.entries() if s != step]  # a resumed attempt evaluates it again
        if not self._kept_steps([*kept, (step, entry)]) & {step}:
            return
        weights = trained_weights(model)
        if not weights:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _replace(self.folder / f"step-{step}.safetensors", lambda path: save_file(weights, str(path)))
        _replace(self.folder / f"step-{step}.json", lambda path: path.write_text(json.dumps(entry)))
        self.prune()

    def entries(self) -> list[tuple[int, dict[str, float]]]:
        """(step, values) of the kept evaluations, by step."""
        found = []
        for path in self.folder.glob("step-*.json"):
            step = path.stem[len("step-"):]
            if step.isdigit() and path.with_suffix(".safetensors").is_file():
                found.append((int(step), json.loads(path.read_text())))
        return sorted(found)

    def _kept_steps(self, entries: list[tuple[int, dict[str, float]]]) -> set[int]:
        on_front = tradeoff.front(tradeoff.points(entries, self.metric), self.metric)
        if len(on_front) > self.most:  # the extremes, the balanced one, then the newest
            best = max(on_front, key=lambda p: tradeoff.gain(self.metric, p.metric, 0.0))
            least = min(on_front, key=lambda p: p.forgetting)
            middle = tradeoff.balanced(on_front, self.metric)
            keep = {best.key, least.key, middle.key}
            for point in reversed(on_front):
                if len(keep) >= self.most:
                    break
                keep.add(point.key)
            return keep
        return {p.key for p in on_front}

    def prune(self) -> None:
        entries = self.entries()
        keep = self._kept_steps(entries)
        for step, _ in entries:
            if step not in keep:
                for suffix in (".safetensors", ".json"):
                    (self.folder / f"step-{step}{suffix}").unlink(missing_ok=True)

    def export(
        self,
        model: torch.nn.Module,
        step: int,
        final_values: dict[str, Any],
        card: dict[str, Any],
        write: Callable[[torch.nn.Module, Path, dict[str, Any]], Path],
        merges: bool = False,
    ) -> list[dict[str, Any]]:
        """Write each kept evaluation still on the front with the final model (at `step`, with
        `final_values`) as an artifact: `write(model, folder, card)` is the recipe's export, `card`
        the final model's card metrics (each checkpoint's card gets its own step and values).
        `merges`: the export changes the model it is given (LoRA merged in): it gets a copy.

        The result's "checkpoints": the front and the final model (listed even when a kept one
        beats it), oldest first, each {"step", "metrics" (the primary metric and forgetting),
        "final", "balanced", "zip" (None for the final model, which is the job's own download)}.
        [] when the final evaluation did not measure both."""
        final = numbers(final_values)
        if not tradeoff.points([(step, final)], self.metric):
            return []  # the final model cannot be weighed against the kept ones
        entries = [(s, v) for s, v in self.entries() if s != step] + [(step, final)]
        listed_steps = self._kept_steps(entries) | {step}  # the final model is listed even when beaten
        candidates = tradeoff.points([(s, v) for s, v in entries if s in listed_steps], self.metric)
        base = (card.get("metrics_before") or {}).get(self.metric)
        balanced = tradeoff.balanced(candidates, self.metric, base)
        current = trained_weights(model) if len(candidates) > 1 else {}  # the final model's, put back after
        listed = []
        try:
            for point in candidates:
                is_final = point.key == step
                entry = {"step": point.key, "final": is_final, "balanced": point is balanced, "zip": None,
                         "metrics": {self.metric: point.metric, "forgetting": point.forgetting}}
                if not is_final:
                    entry["zip"] = str(self._write(model, point.key, dict(entries)[point.key], card, write, merges))
                listed.append(entry)
        finally:
            if current:
                load_weights(model, current)
        return listed

    def _write(self, model, step: int, values: dict[str, float], card: dict[str, Any], write, merges: bool) -> Path:
        load_weights(model, load_file(str(self.folder / f"step-{step}.safetensors")))
        target = copy.deepcopy(model) if merges else model
        name = f"{artifact_name(self.spec)}-step-{step}"
        folder = self.folder / name
        card = {**card, "steps": step, "checkpoint_step": step, "metrics_after": values, "train_loss": None,
                "eval_loss": values.get("eval_loss")}
        write(target, folder, card)
        zipped = zip_dir(folder, Path(self.spec.output_dir) / f"{name}.zip")
        shutil.rmtree(folder, ignore_errors=True)
        return zipped


def _replace(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file: the old file (perhaps hard-linked from an earlier attempt's
    folder) is replaced, never written into."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
