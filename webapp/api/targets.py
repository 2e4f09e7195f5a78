"""From a model name (or a job and "base"/"tuned") to the inference server's target.

The web app decides what a request may run on: a catalog base, or one of the user's own
succeeded jobs. The target names the folders the inference server loads (the job's adapter on
its base, or its whole model) and the kind of model it is; the server never sees a user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from webapp.api import models_api
from webapp.jobs.models import SUCCEEDED, TRAIN, Job
from worker.catalog import CATALOG
from worker.spec import SpecError

KIND_OF_TASK = {"sft": "chat", "dpo": "chat", "kto": "chat", "classify": "classify", "pair": "classify",
                "rerank": "rerank", "embed": "embed", "domain": "chat"}
KIND_OF_CATALOG = {"causal-lm": "chat", "encoder": "embed"}
ENDPOINT_OF_KIND = {"chat": "/v1/chat/completions", "embed": "/v1/embeddings", "rerank": "/v1/rerank",
                    "classify": "/v1/classify"}
KIND_WORDS = {"chat": "a chat model", "embed": "an embedding model", "rerank": "a reranker",
              "classify": "a classifier"}
ADAPTER_SUBDIR = "adapter"  # worker.sentence_models.ADAPTER_SUBDIR: an encoder job's unmerged adapter


@dataclass
class Refusal(Exception):
    status: int
    message: str
    param: str | None = "model"
    code: str | None = None


def for_model(user, name: Any, kind: str) -> dict[str, Any]:
    """The target of a public API request naming `name`, which must be `kind` (chat, embed, ...)."""
    if not isinstance(name, str) or not name:
        raise Refusal(400, "model is required: a name from GET /v1/models.", code="missing_model")
    if name in CATALOG:
        catalog_kind = KIND_OF_CATALOG[CATALOG[name].kind]
        # A bare encoder ranks documents by its embeddings' cosine similarity.
        if kind != catalog_kind and not (catalog_kind == "embed" and kind == "rerank"):
            raise _wrong_kind(name, catalog_kind, kind)
        return {"name": name, "kind": kind, "base": name}
    job = _job_named(user, name)
    return tuned(job, kind, name)


def _job_named(user, name: str) -> Job:
    job_id = name.rsplit(":", 1)[-1] if name.startswith(models_api.FINE_TUNE_PREFIX) else ""
    job = Job.objects.filter(id=int(job_id), owner=user, kind=TRAIN).select_related("owner").first() \
        if job_id.isdigit() else None
    if job is None or models_api.model_name(job) != name:
        raise Refusal(404, f"The model '{name}' does not exist or you do not have access to it.",
                      code="model_not_found")
    return job


def of_job(job: Job, which: str) -> dict[str, Any]:
    """The playground's target for a job: its fine-tune ("tuned") or the model it started from ("base")."""
    kind = KIND_OF_TASK[job.spec.get("task", "sft")]  # jobs from before task families were SFT
    target = tuned(job, kind, models_api.model_name(job))
    if which == "tuned":
        return target
    # The base: the same base folder without the job's weights (a classifier keeps its untrained
    # head, drawn from the job's seed, as the job measured it at step 0).
    return {"name": f"{target['name']} (base)", "kind": kind, "base": target["base"],
            "labels": target.get("labels", []), "seed": target.get("seed", 0)}


def tuned(job: Job, kind: str, name: str) -> dict[str, Any]:
    if job.state != SUCCEEDED:
        raise Refusal(400, f"Job {job.id} is {job.state.replace('_', ' ')}: its model can be used once the job "
                           "has succeeded.", code="model_not_ready")
    job_kind = KIND_OF_TASK[job.spec.get("task", "sft")]
    if job_kind != kind:
        raise _wrong_kind(name, job_kind, kind)
    try:
        base = job.train_spec().base_model
    except SpecError as exc:
        raise Refusal(400, f"Job {job.id}'s model cannot be served: {exc.message}.") from exc
    final = job.final_dir
    target: dict[str, Any] = {"name": name, "kind": kind, "base": base, "seed": job.spec.get("seed", 0)}
    if (final / "adapter_config.json").is_file():
        target["adapter"] = str(final)
    elif (final / ADAPTER_SUBDIR / "adapter_config.json").is_file():
        target["adapter"] = str(final / ADAPTER_SUBDIR)
    elif (final / "config.json").is_file():
        target["model"] = str(final)
    else:
        raise Refusal(503, f"The files of job {job.id}'s model are missing from this server's storage.",
                      code="artifact_missing")
    if kind == "classify":
        target["labels"] = _labels(final)
    return target


def _labels(final) -> list[str]:
    try:
        id2label = json.loads((final / "config.json").read_text()).get("id2label") or {}
    except (OSError, ValueError):
        return []
    return [id2label[key] for key in sorted(id2label, key=int)]


def _wrong_kind(name: str, actual: str, wanted: str) -> Refusal:
    return Refusal(400, f"The model '{name}' is {KIND_WORDS[actual]}; {ENDPOINT_OF_KIND[wanted]} "
                        f"serves {KIND_WORDS[wanted]}. Call {ENDPOINT_OF_KIND[actual]} with it.")
