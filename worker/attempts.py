"""Each attempt at a job works in a folder of its own; only the attempt that holds the lease
publishes what it made.

    jobs/<id>/attempt-<n>/     attempt n's checkpoints, baseline.json, final/, the zip
    jobs/<id>/final/           published by the attempt that finishes the job, with the zip,
                               eval_predictions.json and the zips of the checkpoints kept for
                               download (result["checkpoints"], worker.snapshots) beside it

A new attempt starts from the newest signed checkpoint of the latest earlier attempt that has
one, hard-linked into its own folder (the weights are not copied), with the stored baseline
and the weights kept at its evaluations;
the earlier folders are then deleted. A reaped attempt that still runs (its worker stalled, then
woke up) writes only into its own folder, which nobody reads again, and its lease no longer
lets it publish or record anything (webapp.jobs.models.Lease).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from worker import checkpoints

PREFIX = "attempt-"
PUBLISHED = ("final", "eval_predictions.json")
FILE_KEYS = ("artifact_zip", "rows_json", "rows_csv")
"""Result keys naming a file of the attempt's folder that is published with it."""


def folder_of(job_dir: Path, attempt: int) -> Path:
    """Where attempt `attempt` at the job works."""
    return Path(job_dir) / f"{PREFIX}{attempt}"


def prepare(job_dir: Path, attempt: int) -> Path:
    """Make attempt `attempt`'s folder, seeded with the checkpoint it resumes from, if any."""
    folder = folder_of(job_dir, attempt)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [f for f in _attempt_folders(job_dir) if _number(f) < attempt]
    # Newest attempt first; the job folder itself holds the checkpoints of jobs started before
    # attempts had folders of their own.
    for source in [*sorted(earlier, key=_number, reverse=True), job_dir]:
        checkpoint = checkpoints.latest_checkpoint(source)
        baseline = source / checkpoints.BASELINE
        if checkpoint is not None and baseline.is_file():
            _link_tree(Path(checkpoint), folder / Path(checkpoint).name)
            _link(baseline, folder / checkpoints.BASELINE)
            if (source / checkpoints.EVALUATED).is_dir():
                _link_tree(source / checkpoints.EVALUATED, folder / checkpoints.EVALUATED)
            break
    for old in earlier:
        shutil.rmtree(old, ignore_errors=True)
    _discard_unfoldered(job_dir)
    return folder


def publish(folder: Path, job_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Move the attempt's model, zip and predictions (an evaluation's per-row files) into the
    job's folder; the result with the published paths."""
    for name in _published(result):
        if (folder / name).exists():
            _remove(job_dir / name)
            os.replace(folder / name, job_dir / name)
    published: dict[str, Any] = {key: str(job_dir / Path(result[key]).name) for key in FILE_KEYS if key in result}
    if "artifact_zip" in result:
        published["artifact_dir"] = str(job_dir / "final")
    if result.get("checkpoints"):
        published["checkpoints"] = [
            {**entry, "zip": str(job_dir / Path(entry["zip"]).name) if entry.get("zip") else None}
            for entry in result["checkpoints"]
        ]
    return {**result, **published}


def unpublish(job_dir: Path, result: dict[str, Any]) -> None:
    """Take back what `publish` put in place (the job ended otherwise in the meantime)."""
    for name in _published(result):
        _remove(job_dir / name)


def _published(result: dict[str, Any]) -> list[str]:
    """The names of what a result publishes: the model, the files it names, the zips of the
    checkpoints kept for download (worker.snapshots)."""
    zips = [Path(entry["zip"]).name for entry in result.get("checkpoints") or () if entry.get("zip")]
    return [*PUBLISHED, *(Path(result[key]).name for key in FILE_KEYS if key in result), *zips]


def discard(job_dir: Path) -> None:
    """Delete a finished job's working files (every attempt's folder, old-style checkpoints):
    it never resumes. What was published stays."""
    for folder in _attempt_folders(job_dir):
        shutil.rmtree(folder, ignore_errors=True)
    _discard_unfoldered(job_dir)


def jobs_with_working_files(jobs_root: Path) -> set[int]:
    """The ids of the jobs that still have an attempt folder."""
    return {int(f.parent.name) for f in Path(jobs_root).glob(f"*/{PREFIX}*") if f.parent.name.isdigit()}


def _discard_unfoldered(job_dir: Path) -> None:
    """Checkpoints and the baseline kept in the job's folder itself (jobs started before
    attempts had folders of their own)."""
    for folder in job_dir.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)
    (job_dir / "baseline.json").unlink(missing_ok=True)


def _attempt_folders(job_dir: Path) -> list[Path]:
    return [f for f in job_dir.glob(f"{PREFIX}*") if f.is_dir() and f.name[len(PREFIX):].isdigit()]


def _number(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def _link_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=_link, dirs_exist_ok=True)


def _link(source: str | Path, target: str | Path) -> None:
    """A hard link (instant, no space), or a copy where the filesystem has none."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
