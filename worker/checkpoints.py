"""Resumable checkpoints that only this server can have written.

The Trainer saves `checkpoint-<step>/` folders (weights, optimizer, scheduler, RNG state and
the data position) under the job's output folder. After each save we sign the folder: an
HMAC, keyed by the server's SECRET_KEY, over the SHA-256 of every file. A requeued job resumes
from the newest folder whose signature checks out, so a file planted in the output folder is
never loaded (Trainer's resume reads pickled optimizer and RNG state). Old checkpoints are
pruned: the last one and the one with the best held-out score stay. Each folder carries the
resolved spec as ``train_spec.json`` (signed with the rest), so a checkpoint alone says how it
was made.

Pure file work (no torch: the web side names attempt folders through worker.attempts, which
seeds them from here); the Trainer callback that saves and signs is worker/checkpointing.py.

A resumed job keeps the step-0 baseline its first attempt measured (``baseline.json``): the
untouched model is gone by then, and its numbers are already on the job page.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.events import Reporter
from worker.spec import TrainSpec

log = logging.getLogger(__name__)

SIGNATURE = "specialist-signature.json"
SPEC = "train_spec.json"  # the name the final artifact gives it too (worker.artifacts)
PREFIX = "checkpoint-"
BASELINE = "baseline.json"
EVALUATED = "evaluated"
"""The kept weights of the evaluations during training (worker.snapshots), resumed with the rest."""


def _key() -> bytes:
    return os.environ.get("SECRET_KEY", "dev-only-insecure-key-set-SECRET_KEY-in-production").encode()


def _manifest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SIGNATURE)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _mac(manifest: dict[str, str], score: float | None) -> str:
    payload = json.dumps({"files": manifest, "score": score}, sort_keys=True).encode()
    return hmac.new(_key(), payload, hashlib.sha256).hexdigest()


def sign(folder: Path, score: float | None) -> None:
    """Sign a checkpoint folder; `score` is its held-out score, lower is better (None: not evaluated)."""
    manifest = _manifest(folder)
    record = {"files": manifest, "score": score, "hmac": _mac(manifest, score)}
    (folder / SIGNATURE).write_text(json.dumps(record, indent=1))


def is_signed(folder: Path) -> bool:
    try:
        record = json.loads((folder / SIGNATURE).read_text())
        expected = _mac(_manifest(folder), record["score"])
    except (OSError, ValueError, KeyError):
        return False
    return hmac.compare_digest(record.get("hmac", ""), expected) and record["files"] == _manifest(folder)


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint folders of a job, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint this server signed, or None to start from scratch."""
    for folder in reversed(checkpoints(output_dir)):
        if is_signed(folder):
            return str(folder)
        log.warning("ignoring %s: not a checkpoint this server wrote (or it is incomplete)", folder)
    return None


def _score(folder: Path) -> float | None:
    try:
        return json.loads((folder / SIGNATURE).read_text())["score"]
    except (OSError, ValueError, KeyError):
        return None


def prune(output_dir: Path) -> None:
    """Keep the newest checkpoint and the one with the best (lowest) held-out score."""
    folders = [f for f in checkpoints(output_dir) if is_signed(f)]
    if len(folders) <= 1:
        return
    keep = {folders[-1]}
    scored = [(score, f) for f in folders if (score := _score(f)) is not None]
    if scored:
        keep.add(min(scored, key=lambda pair: pair[0])[1])
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def resume_point(spec: TrainSpec, reporter: Reporter) -> tuple[str | None, Any]:
    """(the checkpoint to resume from, the baseline the first attempt stored), or (None, None)
    to start from scratch: a job resumes only when it has both."""
    checkpoint = latest_checkpoint(Path(spec.output_dir))
    baseline = Path(spec.output_dir) / BASELINE
    if checkpoint is None or not baseline.is_file():
        return None, None
    reporter.log(f"Resuming from the checkpoint at step {checkpoint.rsplit('-', 1)[1]}.")
    return checkpoint, json.loads(baseline.read_text())


def keep_baseline(spec: TrainSpec, baseline: Any) -> None:
    """Store the step-0 baseline (JSON) for a resumed attempt."""
    path = Path(spec.output_dir) / BASELINE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline))


def resume_or_measure(spec: TrainSpec, reporter: Reporter, measure: Callable[[], Any]) -> tuple[str | None, Any]:
    """(the checkpoint to resume from, the baseline the first attempt kept), or (None, measure()):
    the baseline measured now, and kept for a later attempt."""
    resume_from, kept = resume_point(spec, reporter)
    if resume_from is not None:
        return resume_from, kept
    baseline = measure()
    keep_baseline(spec, baseline)
    return None, baseline
