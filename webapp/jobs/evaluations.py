"""Evaluating models on a test set (a ready dataset of any task family): the form that starts an
evaluation job, the spec it runs (worker.spec.EvalSpec, run by worker.evaluation), and the
dataset's leaderboard, which every succeeded evaluation on it adds to (the latest score of each
model stands)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django import forms
from django.conf import settings

from webapp.jobs.models import EVALUATE, SUCCEEDED, TRAIN, Job
from webapp.jobs.playground import base_name

ROW_LIMIT = 500
"""Rows the per-row page shows at once (the CSV has them all)."""


class JobChoiceField(forms.ModelMultipleChoiceField):
    def label_from_instance(self, job: Job) -> str:
        return f"Job {job.id}: {job.name} · {job.spec.get('method')} · {base_name(job.spec.get('base_model', ''))}"


class EvaluateForm(forms.Form):
    jobs = JobChoiceField(queryset=Job.objects.none(), required=False, widget=forms.CheckboxSelectMultiple,
                          label="Fine-tunes", help_text="Your succeeded jobs of this task.")
    checkpoints = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Checkpoints",
        help_text="Those your jobs kept for download: the evaluations during training no other beats on both the "
                  "task metric and forgetting.")
    include_base = forms.BooleanField(required=False, initial=True, label="The base model of each",
                                      help_text="The untouched base, to see what fine-tuning bought.")

    def __init__(self, *args, dataset, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = dataset
        self.fields["jobs"].queryset = evaluable_jobs(dataset)
        self.kept = kept_checkpoints(self.fields["jobs"].queryset)
        self.fields["checkpoints"].choices = [(key, label) for key, (_, _, label) in self.kept.items()]
        if not self.kept:
            del self.fields["checkpoints"]

    def clean(self):
        data = super().clean()
        if not data.get("jobs") and not data.get("checkpoints"):
            raise forms.ValidationError("Choose at least one fine-tune to evaluate.")
        active = Job.objects.filter(owner=self.dataset.owner, state__in=Job.ACTIVE_STATES).count()
        if active >= settings.MAX_ACTIVE_JOBS_PER_USER:
            raise forms.ValidationError(f"You have {active} jobs queued or running, the most one person may have at "
                                        "once; wait for one to finish.")
        return data

    def spec(self) -> dict[str, Any]:
        """The evaluation job's spec: the models in order (each base before its fine-tunes, each
        job's final model before its checkpoints)."""
        checkpoints = [self.kept[key] for key in self.cleaned_data.get("checkpoints") or []]
        jobs = sorted({*self.cleaned_data["jobs"], *(job for job, _, _ in checkpoints)}, key=lambda job: job.id)
        models: list[dict[str, Any]] = []
        if self.cleaned_data["include_base"]:
            seen = set()
            for job in jobs:
                if job.spec["base_model"] not in seen:
                    seen.add(job.spec["base_model"])
                    models.append(_base_entry(job, several=len({j.spec["base_model"] for j in jobs}) > 1))
        for job in jobs:
            if job in self.cleaned_data["jobs"]:
                models.append({"label": f"Job {job.id}: {job.name}", "spec": _spec_of(job),
                               "final_dir": str(job.final_dir), "job_id": job.id})
            for kept_job, entry, _ in sorted(checkpoints, key=lambda chosen: chosen[1]["step"]):
                if kept_job == job:
                    models.append({"label": f"Job {job.id}: {job.name} · step {entry['step']}", "spec": _spec_of(job),
                                   "checkpoint_zip": entry["zip"], "job_id": job.id, "step": entry["step"]})
        return {"task": self.dataset.task, "models": models, "batch_size": jobs[0].spec.get("batch_size", 8),
                "max_seq_length": max(job.spec.get("max_seq_length", 512) for job in jobs),
                "base_model": jobs[0].spec["base_model"], "method": "evaluate"}


def can_evaluate(dataset) -> bool:
    """Whether the dataset page offers to evaluate on it: ready, and one of its owner's fine-tunes
    of its task to evaluate."""
    return dataset.is_ready and evaluable_jobs(dataset).exists()


def kept_checkpoints(jobs) -> dict[str, tuple[Job, dict[str, Any], str]]:
    """The checkpoints `jobs` kept for download (worker.snapshots), by form value "<job>:<step>":
    (the job, the result's entry, the form's label)."""
    kept = {}
    for job in jobs:
        for entry in job.result.get("checkpoints") or []:
            if entry.get("final") or job.checkpoint_zip(entry["step"]) is None:
                continue
            shown = ", ".join(f"{name} {value:.4g}" for name, value in entry["metrics"].items())
            best = " · best trade-off" if entry.get("balanced") else ""
            kept[f"{job.id}:{entry['step']}"] = (job, entry, f"Job {job.id}: {job.name} · step {entry['step']} "
                                                             f"({shown}){best}")
    return kept


def evaluable_jobs(dataset):
    jobs = Job.objects.filter(owner=dataset.owner, state=SUCCEEDED, kind=TRAIN, spec__task=dataset.task)
    return jobs.order_by("-finished_at", "-id")


def _spec_of(job: Job) -> dict[str, Any]:
    return asdict(job.train_spec())


def _base_entry(job: Job, several: bool) -> dict[str, Any]:
    label = f"Base model ({base_name(job.spec['base_model'])})" if several else "Base model"
    labels = _labels(job) if job.spec.get("task") in ("classify", "pair") else []
    return {"label": label, "spec": _spec_of(job), "labels": labels}


def _labels(job: Job) -> list[str]:
    """A classifier job's labels, in the order of its head (its saved config)."""
    config = json.loads((job.final_dir / "config.json").read_text())
    return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]


def start(user, dataset, form: EvaluateForm) -> Job:
    return Job.start(user, dataset, form.spec(), name=f"Evaluation on {dataset.name}", kind=EVALUATE)


def leaderboard(dataset) -> dict[str, Any]:
    """The dataset's leaderboard: the latest succeeded evaluation's score of each model on it
    (table() of the entries, each with the evaluation it comes from)."""
    entries: dict[str, dict[str, Any]] = {}
    evaluations = Job.objects.filter(dataset=dataset, kind=EVALUATE, state=SUCCEEDED).order_by("-finished_at", "-id")
    for evaluation in evaluations:
        for entry in evaluation.result.get("leaderboard", []):
            entries.setdefault(entry["label"], {**entry, "evaluation": evaluation.id})
    return table(list(entries.values()))


def table(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """{"metrics": [names], "rows": [entry + "values", one per name]} of leaderboard entries."""
    names: list[str] = []
    for entry in entries:
        names += [name for name in entry["metrics"] if name not in names]
    rows = [{**entry, "values": [entry["metrics"].get(name) for name in names]} for entry in entries]
    return {"metrics": names, "rows": rows}


def row_records(job: Job, sort: str) -> list[dict[str, Any]]:
    """The evaluation's per-row records, sorted: "worse" (the biggest regressions first),
    "better", or by row."""
    try:
        records = json.loads(Path(job.result["rows_json"]).read_text())
    except (KeyError, OSError, ValueError):
        return []
    if sort in ("worse", "better"):
        scored = [r for r in records if r["change"] is not None]
        scored.sort(key=lambda r: r["change"], reverse=sort == "better")
        records = scored + [r for r in records if r["change"] is None]
    return records[:ROW_LIMIT]
