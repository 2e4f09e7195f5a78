"""The "Try it" playground of a succeeded job and the compare page.

One input goes to several models at once, each a column: on the job page the job's base and its
fine-tune (/jobs/<id>/try/base/ and /try/tuned/, webapp.api), on the compare page the fine-tunes
of up to four jobs of one task and base. The form is shaped by the job's task family; it starts
from a held-out example the job kept (its result, or eval_predictions.json beside final/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.http import Http404
from django.urls import reverse

from webapp.jobs.models import JOB_BASE_PREFIX, SUCCEEDED, TRAIN, Job
from worker.catalog import CATALOG
from worker.families import FAMILIES

FORM_OF_TASK = {"sft": "chat", "dpo": "chat", "kto": "chat", "classify": "classify", "pair": "pair",
                "rerank": "rerank", "embed": "embed", "domain": "chat"}
"""Which playground form a task family gets: the generative families chat, the others encode."""
PREDICTIONS = "eval_predictions.json"
MAX_PREDICTIONS_BYTES = 5 * 2**20  # a large held-out set is not read to draw a page
MAX_DOCUMENTS = 20
MAX_COMPARED = 4


@dataclass(frozen=True)
class Column:
    """One model the playground asks: its heading and the endpoint that answers for it."""

    title: str
    url: str


@dataclass(frozen=True)
class Playground:
    form: str
    """The form's shape: chat, classify, pair, rerank or embed (FORM_OF_TASK)."""
    columns: list[Column]
    example: dict[str, str]
    """The form's starting values, by field name (system, prompt, text, text_pair, query, documents)."""


class NotComparable(Exception):
    """The chosen jobs cannot be compared; the message says why, for the person who chose them."""


def task_of(job: Job) -> str:
    return job.spec.get("task", "sft")


def for_job(job: Job) -> Playground:
    """The job page's playground: the base model beside the fine-tune."""
    columns = [Column("Base model", _try_url(job, "base")), Column("Fine-tuned", _try_url(job, "tuned"))]
    return Playground(FORM_OF_TASK[task_of(job)], columns, example(job))


def for_comparison(jobs: list[Job]) -> Playground:
    """The compare page's playground: each job's fine-tune, in the order chosen."""
    columns = [Column(f"Job {job.id}: {job.name}", _try_url(job, "tuned")) for job in jobs]
    return Playground(FORM_OF_TASK[task_of(jobs[0])], columns, example(jobs[0]))


def _try_url(job: Job, which: str) -> str:
    return reverse(f"try_{which}", args=[job.id])


# Starting values -------------------------------------------------------------------------------


def example(job: Job) -> dict[str, str]:
    """A held-out input of the job to start from ({} when the job kept none)."""
    task = task_of(job)
    if task in ("sft", "dpo", "kto"):
        samples = job.result.get("samples") or []
        return {"prompt": samples[0].get("instruction", "")} if samples and isinstance(samples[0], dict) else {}
    predictions = _predictions(job)
    try:
        return EXAMPLE_OF_TASK[task](predictions) if predictions else {}
    except (KeyError, TypeError, AttributeError, IndexError):
        return {}  # predictions of an older shape: start empty


def _predictions(job: Job) -> Any:
    path = job.output_dir / PREDICTIONS
    try:
        if path.stat().st_size > MAX_PREDICTIONS_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _one_line(text: str) -> str:
    """A document as one line of the documents box (one document a line)."""
    return " ".join(str(text).split())


def _classify_example(rows: list[dict]) -> dict[str, str]:
    return {"text": rows[0]["text"]}


def _pair_example(rows: list[dict]) -> dict[str, str]:
    return {"text": rows[0]["text_a"], "text_pair": rows[0]["text_b"]}


def _rerank_example(rows: list[dict]) -> dict[str, str]:
    """The first held-out query with its documents (rerank's predictions: one row per pair)."""
    query = rows[0]["query"]
    documents = [_one_line(row["document"]) for row in rows if row["query"] == query]
    return {"query": query, "documents": "\n".join(documents[:MAX_DOCUMENTS])}


def _embed_example(predictions: dict) -> dict[str, str]:
    """The first held-out query and a small corpus that holds its positives."""
    first = predictions["queries"][0]
    corpus = list(dict.fromkeys(_one_line(d) for d in [*first["positives"], *predictions["corpus"]]))
    return {"query": first["query"], "documents": "\n".join(corpus[:MAX_DOCUMENTS])}


def _domain_example(documents: list[dict]) -> dict[str, str]:
    """The start of the first held-out document, for the models to go on with."""
    return {"prompt": documents[0]["text"]}


EXAMPLE_OF_TASK = {"classify": _classify_example, "pair": _pair_example, "rerank": _rerank_example,
                   "embed": _embed_example, "domain": _domain_example}


# Comparing -------------------------------------------------------------------------------------


def chosen_ids(values: list[str]) -> list[int]:
    """Job ids from ?jobs=3,5,7 (or ?jobs=3&jobs=5), in order, each once."""
    parts = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise NotComparable("The jobs to compare are named by their numbers, such as ?jobs=3,5.")
    return list(dict.fromkeys(int(part) for part in parts))


def jobs_to_compare(user, values: list[str]) -> list[Job]:
    """The user's jobs named in `values`, if they can be compared; another user's job is not
    found (Http404), as on its own page."""
    ids = chosen_ids(values)
    if not 2 <= len(ids) <= MAX_COMPARED:
        raise NotComparable(f"Choose two to {MAX_COMPARED} jobs to compare; {len(ids)} were chosen.")
    found = {job.id: job for job in Job.objects.filter(owner=user, id__in=ids, kind=TRAIN)}
    if len(found) < len(ids):
        raise Http404("No such job.")
    jobs = [found[job_id] for job_id in ids]
    unfinished = [job for job in jobs if job.state != SUCCEEDED]
    if unfinished:
        names = ", ".join(f"job {job.id} is {job.state}" for job in unfinished)
        raise NotComparable(f"Only succeeded jobs have a model to try: {names}.")
    if len({(task_of(job), job.spec.get("base_model")) for job in jobs}) > 1:
        raise NotComparable("Only jobs of the same task on the same base model answer the same input comparably: "
                            + "; ".join(f"job {job.id} is {describe(job)}" for job in jobs) + ".")
    return jobs


def describe(job: Job) -> str:
    """The job's task and base, in words: "Classification on all-MiniLM-L6-v2"."""
    return f"{FAMILIES[task_of(job)].name} on {base_name(job.spec.get('base_model', ''))}"


def base_name(base: str) -> str:
    if base in CATALOG:
        return CATALOG[base].name
    if base.startswith(JOB_BASE_PREFIX):
        return f"the model of job {base[len(JOB_BASE_PREFIX):]}"
    return base


def comparable_groups(user) -> list[dict[str, Any]]:
    """The user's succeeded jobs by task and base, newest first: the compare page's choices."""
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in Job.objects.filter(owner=user, state=SUCCEEDED, kind=TRAIN).order_by("-finished_at", "-id")[:200]:
        groups.setdefault((task_of(job), job.spec.get("base_model", "")), []).append(job)
    return [{"title": describe(jobs[0]), "jobs": jobs} for jobs in groups.values()]
