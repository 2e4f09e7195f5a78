"""Resumable checkpoints that only this server can have written.

The Trainer saves `checkpoint-<step>/` folders (weights, optimizer, scheduler, RNG state and
the data position) under the job's output folder. After each save we sign the folder: an
HMAC, keyed by the server's SECRET_KEY, over the SHA-256 of every file. A requeued job resumes
from the newest folder whose signature checks out, so a file planted in the output folder is
never loaded (Trainer's resume reads pickled optimizer and RNG state). Old checkpoints are
pruned: the last one and the one with the best validation loss stay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from worker.events import Reporter
from worker.spec import TrainSpec

log = logging.getLogger(__name__)

SIGNATURE = "specialist-signature.json"
PREFIX = "checkpoint-"


def _key() -> bytes:
    return os.environ.get("SECRET_KEY", "dev-only-insecure-key-set-SECRET_KEY-in-production").encode()


def _manifest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SIGNATURE)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _mac(manifest: dict[str, str], eval_loss: float | None) -> str:
    payload = json.dumps({"files": manifest, "eval_loss": eval_loss}, sort_keys=True).encode()
    return hmac.new(_key(), payload, hashlib.sha256).hexdigest()


def sign(folder: Path, eval_loss: float | None) -> None:
    manifest = _manifest(folder)
    record = {"files": manifest, "eval_loss": eval_loss, "hmac": _mac(manifest, eval_loss)}
    (folder / SIGNATURE).write_text(json.dumps(record, indent=1))


def is_signed(folder: Path) -> bool:
    try:
        record = json.loads((folder / SIGNATURE).read_text())
        expected = _mac(_manifest(folder), record["eval_loss"])
    except (OSError, ValueError, KeyError):
        return False
    return hmac.compare_digest(record.get("hmac", ""), expected) and record["files"] == _manifest(folder)


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint folders of a job, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint this server signed, or None to start from scratch."""
    for folder in reversed(checkpoints(output_dir)):
        if is_signed(folder):
            return str(folder)
        log.warning("ignoring %s: not a checkpoint this server wrote (or it is incomplete)", folder)
    return None


def _eval_loss(folder: Path) -> float | None:
    try:
        return json.loads((folder / SIGNATURE).read_text())["eval_loss"]
    except (OSError, ValueError, KeyError):
        return None


def prune(output_dir: Path) -> None:
    """Keep the newest checkpoint and the one with the lowest validation loss."""
    folders = [f for f in checkpoints(output_dir) if is_signed(f)]
    if len(folders) <= 1:
        return
    keep = {folders[-1]}
    scored = [(loss, f) for f in folders if (loss := _eval_loss(f)) is not None]
    if scored:
        keep.add(min(scored, key=lambda pair: pair[0])[1])
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


class Checkpointing(TrainerCallback):
    """Saves on the step schedule and at least every spec.checkpoint_minutes; signs and prunes."""

    def __init__(self, spec: TrainSpec, reporter: Reporter):
        self.spec = spec
        self.reporter = reporter
        self.last_save = time.monotonic()
        self.eval_loss: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.eval_loss = float(metrics["eval_loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last_save >= self.spec.checkpoint_minutes * 60:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if folder.is_dir():
            sign(folder, self.eval_loss)
            prune(Path(args.output_dir))
            self.reporter.log(f"Checkpoint saved at step {state.global_step}.", step=state.global_step)
