"""Runs side by side: their curves on one chart, the settings that differ, the metrics they reached,
which one is best by the held-out metric and which strikes the best trade-off between that metric
and forgetting (worker.tradeoff). The compare page and a sweep's group page both draw from here."""

from __future__ import annotations

from typing import Any

from webapp.jobs.models import SUCCEEDED, Job, JobEvent
from worker import tradeoff
from worker.families import FAMILIES
from worker.tradeoff import better

HIDDEN_SETTINGS = {"dataset_name", "validation_path", "task", "base_model", "eval_every", "checkpoint_every",
                   "checkpoint_minutes"}
"""Spec keys the settings table leaves out: shared by construction, or where, not how, a job trains."""


def primary_metric(job: Job) -> str:
    return FAMILIES[job.spec.get("task", "sft")].primary_metric


def curves(jobs: list[Job]) -> list[dict[str, Any]]:
    """Per job: its training loss by step, and each held-out metric by evaluation step (the
    baseline at step 0), from its events."""
    series = {job.id: {"id": job.id, "name": f"Job {job.id}: {job.name}", "state": job.state, "loss": [],
                       "evals": {}, "primary": primary_metric(job)} for job in jobs}
    events = JobEvent.objects.filter(job__in=jobs, kind__in=("metric", "eval")).order_by("seq")
    for event in events.values("job_id", "kind", "step", "data"):
        entry, data = series[event["job_id"]], event["data"]
        if event["kind"] == "metric" and isinstance(data.get("loss"), int | float):
            entry["loss"].append([event["step"], data["loss"]])
        elif event["kind"] == "eval":
            for name, value in data.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and name not in ("step", "t"):
                    entry["evals"].setdefault(name, []).append([event["step"], value])
    return [series[job.id] for job in jobs]


def differing_settings(jobs: list[Job]) -> list[dict[str, Any]]:
    """The settings in which the jobs differ: [{"name", "values": [one per job]}]."""
    names = sorted({name for job in jobs for name in job.spec} - HIDDEN_SETTINGS)
    rows = []
    for name in names:
        values = [job.spec.get(name) for job in jobs]
        if any(value != values[0] for value in values[1:]):
            rows.append({"name": name, "values": [_shown(value) for value in values]})
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "—" if value is None else str(value)


def final_metrics(jobs: list[Job]) -> list[dict[str, Any]]:
    """Each held-out metric any job reported after training: [{"name", "values", "best"}], the
    best job's index marked (lower or higher is better, by metric)."""
    names: list[str] = []
    for job in jobs:
        for name in (job.result.get("metrics_after") or {}):
            if name not in names:
                names.append(name)
    rows = []
    for name in names:
        values = [(job.result.get("metrics_after") or {}).get(name) for job in jobs]
        numbers = [(i, v) for i, v in enumerate(values) if isinstance(v, int | float) and not isinstance(v, bool)]
        best = None
        for index, value in numbers:
            if best is None or better(name, value, values[best]):
                best = index
        rows.append({"name": name, "values": values, "best": best if len(numbers) > 1 else None})
    return rows


def best_job(jobs: list[Job]) -> Job | None:
    """The succeeded job with the best held-out primary metric (None until one has one)."""
    best = None
    for job in jobs:
        value = (job.result.get("metrics_after") or {}).get(primary_metric(job)) if job.state == SUCCEEDED else None
        if not isinstance(value, int | float):
            continue
        if best is None or better(primary_metric(job), value, best[1]):
            best = (job, value)
    return best[0] if best else None


def balanced_job(jobs: list[Job]) -> Job | None:
    """The succeeded run with the best trade-off between its held-out primary metric and its
    forgetting (worker.tradeoff.balanced, gains counted from the base's metric at step 0); None
    until two runs have both numbers (with one there is nothing to weigh)."""
    done = [job for job in jobs if job.state == SUCCEEDED]
    if not done:
        return None
    primary = primary_metric(done[0])
    points = tradeoff.points([(job.id, job.result.get("metrics_after") or {}) for job in done], primary)
    if len(points) < 2:
        return None
    base = (done[0].result.get("metrics_before") or {}).get(primary)
    chosen = tradeoff.balanced(points, primary, base)
    return next(job for job in done if job.id == chosen.key)
