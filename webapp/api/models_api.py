"""The models a key may call, named as the OpenAI API names models.

A catalog base keeps its catalog key ("smollm2-135m-instruct"). A user's fine-tune is
``ft:<base>:<owner>:<job id>``, as OpenAI names fine-tuned models: the base it was trained from
(its catalog key, ``job-<id>`` for a model built on another job, or the folder's name), the
owner's user name and the job's id. The id decides; a name whose other parts do not match the
job, or another user's job, is not found.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from webapp.jobs.models import JOB_BASE_PREFIX, SUCCEEDED, TRAIN, Job
from worker.catalog import CATALOG

FINE_TUNE_PREFIX = "ft:"
JOB_PREFIX = "ftjob-"
"""A fine-tuning job's id in the API and in webhook events: `ftjob-<job id>`."""


def api_job_id(job: Job) -> str:
    return f"{JOB_PREFIX}{job.id}"


def base_label(job: Job) -> str:
    base = job.spec.get("base_model", "")
    if base in CATALOG:
        return base
    if base.startswith(JOB_BASE_PREFIX):
        return f"job-{base[len(JOB_BASE_PREFIX):]}"
    return PurePath(base).name or "model"


def model_name(job: Job) -> str:
    """`ft:<base>:<owner>:<job id>`, with the API caller's suffix before the id when it gave one."""
    suffix = f"{job.suffix}:" if job.suffix else ""
    return f"{FINE_TUNE_PREFIX}{base_label(job)}:{job.owner.username}:{suffix}{job.id}"


def catalog_object(key: str) -> dict[str, Any]:
    # A bundled base has no creation time on this server; OpenAI's client needs a number.
    return {"id": key, "object": "model", "created": 0, "owned_by": "specialist"}


def job_object(job: Job) -> dict[str, Any]:
    created = int((job.finished_at or job.created_at).timestamp())
    return {"id": model_name(job), "object": "model", "created": created, "owned_by": job.owner.username}


def models_of(user) -> list[dict[str, Any]]:
    """The catalog's bases, then the user's succeeded jobs, newest first."""
    jobs = Job.objects.filter(owner=user, state=SUCCEEDED, kind=TRAIN).select_related("owner").order_by("-finished_at", "-id")
    return [*(catalog_object(key) for key in CATALOG), *(job_object(job) for job in jobs)]


def find(user, name: str) -> dict[str, Any] | None:
    """The model object `name` names for `user`; None when it does not exist or is not theirs."""
    if name in CATALOG:
        return catalog_object(name)
    if not name.startswith(FINE_TUNE_PREFIX):
        return None
    job_id = name.rsplit(":", 1)[-1]
    if not job_id.isdigit():
        return None
    job = Job.objects.filter(id=int(job_id), owner=user, state=SUCCEEDED, kind=TRAIN).select_related("owner").first()
    return job_object(job) if job is not None and model_name(job) == name else None
