"""OpenAI's fine-tuning jobs API (`/v1/fine_tuning/jobs`), on the jobs the browser shows.

A job created here is validated by the new-job form itself (webapp.jobs.forms.JobForm), so it
gets the form's checks and, for everything the request leaves out or sets to "auto", the
settings the form suggests for the file's task: a job created with only `model` and
`training_file` is the job the form would have started.

OpenAI's request, translated:
- `method.type`: "supervised" trains the file's own task (instruction tuning on chat files, or
  any other Specialist task its columns hold); "dpo" needs preference pairs; "kto" (Specialist's)
  labelled replies. Its `hyperparameters`: `n_epochs` (then no step limit), `batch_size`,
  `learning_rate_multiplier` (times the suggested learning rate for the method), `beta`.
- Specialist's own settings go in the `specialist` object (the official client sends it with
  `extra_body={"specialist": {...}}`): SPECIALIST_SETTINGS below.
- `model`: a catalog key, `ft:...` of one of the caller's full fine-tunes (to train it further),
  or a model folder the administrator registered.

Ids: `ftjob-<job id>`, events `ftevent-<event id>`, checkpoints `ftckpt-<job id>-<step>`.
A state error (cancelling a finished job) is a 400: the official client retries a 409.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.api import files, models_api
from webapp.api.auth import api_key_required, error
from webapp.api.paging import PagingError, page_of
from webapp.datasets.models import READY, REVIEW, Dataset
from webapp.jobs.forms import CUSTOM, JobForm
from webapp.jobs.models import CANCELLED, JOB_BASE_PREFIX, QUEUED, RUNNING_STATES, SUCCEEDED, TRAIN, Job, JobEvent
from worker.catalog import CATALOG
from worker.families import FAMILIES
from worker.spec import TrainChoices

JOB_PREFIX = models_api.JOB_PREFIX
api_job_id = models_api.api_job_id
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
METHOD_TASKS = {"supervised": None, "dpo": "dpo", "kto": "kto"}
"""method.type -> the task its file must hold (None: any task but the preference ones)."""
PREFERENCE_TASKS = ("dpo", "kto")
HYPERPARAMETERS = {"n_epochs", "batch_size", "learning_rate_multiplier", "beta"}
SPECIALIST_SETTINGS = {
    "task", "name", "method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora",
    "learning_rate", "max_steps", "max_seq_length", "validation_fraction", "loss_on_turns", "dpo_sft_weight",
    "gradient_checkpointing", "drop_validation_overlap", "accept_rejected_rows",
}
"""The `specialist` object's keys: the new-job form's fields, and the choice to train a file
some of whose rows could not be read on the rest."""
STATUS = {QUEUED: "queued", SUCCEEDED: "succeeded", "failed": "failed", CANCELLED: "cancelled",
          **{state: "running" for state in RUNNING_STATES}}
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Invalid(Exception):
    """A request that creates nothing: OpenAI's error shape, naming the parameter."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def response(self) -> JsonResponse:
        return error(self.status, self.message, param=self.param, code=self.code)


# Reading a job request -------------------------------------------------------------------------


def _body(request: HttpRequest) -> dict:
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"The request body is not valid JSON: {exc}.", None) from None
    if not isinstance(body, dict):
        raise Invalid("The request body must be a JSON object.", None)
    return body


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _number(value: Any, param: str, *, whole: bool = False, least: float = 0, more_than: bool = False) -> float | int:
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < least or (more_than and value == least):
        what = "a whole number" if whole else "a number"
        bound = f"greater than {least:g}" if more_than else f"at least {least:g}"
        raise Invalid(f"{param} must be 'auto' or {what} {bound} (got {json.dumps(value)[:40]}).", param)
    return value


class JobRequest:
    """A POST /v1/fine_tuning/jobs body, read into the new-job form's values."""

    def __init__(self, user, body: dict):
        self.user, self.body = user, body
        unknown = sorted(set(body) - {"model", "training_file", "validation_file", "suffix", "seed", "metadata",
                                      "method", "hyperparameters", "integrations", "specialist"})
        if unknown:
            raise Invalid(f"Unknown parameter '{unknown[0]}'.", unknown[0])
        self.extra = self._specialist()
        self.dataset = self._training_file()
        self.method_type, self.method_param, self.hyper = self._method()
        self.validation = self._validation_file()
        self.suffix = self._suffix()
        self.metadata = self._metadata()
        self.seed = self._seed()
        if body.get("integrations"):
            raise Invalid("Integrations (Weights & Biases) are not available on this server; leave them out.",
                          "integrations")

    def _specialist(self) -> dict:
        extra = self.body.get("specialist") or {}
        if not isinstance(extra, dict):
            raise Invalid("specialist must be an object of Specialist settings.", "specialist")
        unknown = sorted(set(extra) - SPECIALIST_SETTINGS)
        if unknown:
            raise Invalid(f"specialist.{unknown[0]} is not a Specialist setting; known: "
                          f"{', '.join(sorted(SPECIALIST_SETTINGS))}.", f"specialist.{unknown[0]}")
        return extra

    def _training_file(self) -> Dataset:
        if "training_file" not in self.body:
            raise Invalid("training_file is required: the id of a file uploaded with purpose fine-tune.",
                          "training_file")
        try:
            dataset = files.dataset_of(self.user, self.body["training_file"], "training_file")
        except files.FileProblem as problem:
            raise Invalid(problem.message, problem.param, code=problem.code) from None
        _check_readable(dataset, "training_file")
        if dataset.status == REVIEW and self.extra.get("accept_rejected_rows") is not True:
            raise Invalid(files.status_of(dataset)[1], "training_file", code="file_has_rejected_rows")
        wanted = self.extra.get("task")
        if wanted is not None and wanted != dataset.task:
            raise Invalid(f"{files.file_id(dataset)} holds data for {FAMILIES[dataset.task].name.lower()} "
                          f"({dataset.task}), not {wanted}: upload it again with task={wanted}.", "specialist.task")
        return dataset

    def _method(self) -> tuple[str, str, dict]:
        method = self.body.get("method")
        if method is None:
            kind = "dpo" if self.dataset.task == "dpo" else "kto" if self.dataset.task == "kto" else "supervised"
            return kind, "hyperparameters", self._hyperparameters(self.body.get("hyperparameters"), "hyperparameters")
        if not isinstance(method, dict):
            raise Invalid("method must be an object such as {\"type\": \"supervised\"}.", "method")
        kind = method.get("type")
        if kind == "reinforcement":
            raise Invalid("Reinforcement fine-tuning is not available on this server; use supervised, dpo or kto.",
                          "method.type")
        if kind not in METHOD_TASKS:
            raise Invalid(f"method.type must be one of supervised, dpo, kto (got {json.dumps(kind)[:40]}).",
                          "method.type")
        needed, task = METHOD_TASKS[kind], self.dataset.task
        if (needed and task != needed) or (not needed and task in PREFERENCE_TASKS):
            holds = FAMILIES[task].row
            fit = {"dpo": "dpo", "kto": "kto"}.get(task, "supervised")
            raise Invalid(f"A {kind} job cannot train on {files.file_id(self.dataset)}: it holds {holds}. "
                          f"Use method type {fit}, or a file of the right shape.", "training_file")
        unknown = sorted(set(method) - {"type", kind})
        if unknown:
            raise Invalid(f"method.{unknown[0]} does not go with method type {kind}.", f"method.{unknown[0]}")
        settings = method.get(kind) or {}
        if not isinstance(settings, dict) or set(settings) - {"hyperparameters"}:
            raise Invalid(f"method.{kind} takes only hyperparameters.", f"method.{kind}")
        param = f"method.{kind}.hyperparameters"
        return kind, param, self._hyperparameters(settings.get("hyperparameters"), param)

    def _hyperparameters(self, given: Any, param: str) -> dict:
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise Invalid(f"{param} must be an object.", param)
        unknown = sorted(set(given) - HYPERPARAMETERS)
        if unknown:
            raise Invalid(f"Unknown hyperparameter '{unknown[0]}'; known: n_epochs, batch_size, "
                          "learning_rate_multiplier, beta.", f"{param}.{unknown[0]}")
        if not _is_auto(given.get("beta")) and self.dataset.task not in PREFERENCE_TASKS:
            raise Invalid("beta applies to dpo and kto jobs only.", f"{param}.beta")
        checked = {}
        for name, rule in (("n_epochs", dict(whole=True, least=1)), ("batch_size", dict(whole=True, least=1)),
                           ("learning_rate_multiplier", dict(more_than=True)), ("beta", dict(more_than=True))):
            if not _is_auto(given.get(name)):
                checked[name] = _number(given[name], f"{param}.{name}", **rule)
        return checked

    def _validation_file(self) -> Dataset | None:
        value = self.body.get("validation_file")
        if value is None:
            return None
        try:
            dataset = files.dataset_of(self.user, value, "validation_file")
        except files.FileProblem as problem:
            raise Invalid(problem.message, problem.param, code=problem.code) from None
        _check_readable(dataset, "validation_file")
        if dataset.status != READY:
            raise Invalid(files.status_of(dataset)[1], "validation_file", code="file_has_rejected_rows")
        if dataset.task != self.dataset.task:
            raise Invalid(f"The validation file holds data for {FAMILIES[dataset.task].name.lower()}, the training "
                          f"file for {FAMILIES[self.dataset.task].name.lower()}.", "validation_file")
        if dataset.id == self.dataset.id:
            raise Invalid("The validation file is the training file: held-out rows must not be trained on.",
                          "validation_file")
        return dataset

    def _suffix(self) -> str:
        suffix = self.body.get("suffix")
        if suffix is None or suffix == "":
            return ""
        if not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix):
            raise Invalid("suffix must be 1 to 64 letters, digits, '.', '_' or '-' (it becomes part of the model's "
                          "name, whose parts are separated by ':').", "suffix")
        return suffix

    def _seed(self) -> int | None:
        seed = self.body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
            raise Invalid("seed must be a whole number from 0 to 2147483647.", "seed")
        return seed

    def _metadata(self) -> dict[str, str]:
        metadata = self.body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY and len(v) <= METADATA_VALUE
            for k, v in metadata.items()
        ):
            raise Invalid(f"metadata must be an object of at most {METADATA_PAIRS} pairs of text, keys up to "
                          f"{METADATA_KEY} characters and values up to {METADATA_VALUE}.", "metadata")
        return metadata

    # The form's values ----------------------------------------------------------------------

    def form_data(self) -> dict[str, Any]:
        """The new-job form's values: its defaults and the task's suggestions, then the request's."""
        family = FAMILIES[self.dataset.task]
        suggested = family.suggested
        extra = self.extra
        method = extra.get("method", suggested.method)
        if method not in family.methods and "method" not in extra:
            method = family.methods[0]
        data = {**TrainChoices.defaults(), "method": method, "max_steps": suggested.max_steps,
                "batch_size": suggested.batch_size, "max_seq_length": suggested.max_seq_length}
        data.update({k: v for k, v in extra.items() if k not in ("task", "name", "accept_rejected_rows")})
        learning_rate = extra.get("learning_rate", suggested.learning_rates.get(method, data["learning_rate"]))
        hyper = self.hyper
        if "learning_rate_multiplier" in hyper:
            learning_rate = learning_rate * hyper["learning_rate_multiplier"]
        data["learning_rate"] = learning_rate
        if "n_epochs" in hyper:
            data["epochs"] = hyper["n_epochs"]
            data["max_steps"] = extra.get("max_steps")
        if "batch_size" in hyper:
            data["batch_size"] = hyper["batch_size"]
        if "beta" in hyper:
            data["dpo_beta"] = hyper["beta"]
        data.update(self._base_model())
        data["dataset"] = self.dataset.id
        data["name"] = str(extra.get("name") or "")[:200]
        if data["max_steps"] is None:
            data["max_steps"] = ""
        return data

    def _base_model(self) -> dict[str, str]:
        model = self.body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise Invalid(f"model is required: one of {', '.join(CATALOG)}, or ft:... of one of your full "
                          "fine-tunes.", "model")
        if model in CATALOG:
            return {"base_model": model}
        if model.startswith(models_api.FINE_TUNE_PREFIX):
            found = models_api.find(self.user, model)
            job_id = model.rsplit(":", 1)[-1]
            if found is None:
                raise Invalid(f"The model '{model[:120]}' does not exist or you do not have access to it.", "model",
                              code="model_not_found")
            return {"base_model": f"{JOB_BASE_PREFIX}{job_id}"}
        return {"base_model": CUSTOM, "custom_base_model": model}


def _check_readable(dataset: Dataset, param: str) -> None:
    status, details = files.status_of(dataset)
    if status == "uploaded":
        raise Invalid(f"{files.file_id(dataset)} is still being read; wait until its status is processed.", param,
                      code="file_not_ready")
    if status == "error":
        raise Invalid(f"{files.file_id(dataset)} could not be read: {details}", param, code="invalid_file")


FORM_PARAMS = {
    "dataset": "training_file", "base_model": "model", "custom_base_model": "model", "epochs": "n_epochs",
    "batch_size": "batch_size", "dpo_beta": "beta", "learning_rate": "learning_rate_multiplier",
}
"""A form field's complaint -> the request's parameter that set it (else specialist.<field>)."""


def _form_error(form: JobForm, request: JobRequest) -> Invalid:
    field, messages = next(iter(form.errors.items()))
    message = " ".join(messages)
    if field == "__all__":
        return Invalid(message, None, code="too_many_jobs" if "jobs queued or running" in message else None)
    if field in request.extra or field not in FORM_PARAMS:
        return Invalid(f"{field}: {message}", f"specialist.{field}")
    param = FORM_PARAMS[field]
    if param in HYPERPARAMETERS:
        param = f"{request.method_param}.{param}"
    if param == "model" and field in ("base_model", "custom_base_model"):
        message = f"{message} Models on this server: {', '.join(CATALOG)}, or ft:... of your full fine-tunes."
    return Invalid(message, param)


# The job object -----------------------------------------------------------------------------


def _job_of(user, value: str) -> Job:
    number = value.removeprefix(JOB_PREFIX)
    job = Job.objects.filter(owner=user, id=int(number), kind=TRAIN).select_related("owner", "dataset").first() \
        if value.startswith(JOB_PREFIX) and number.isdigit() else None
    if job is None:
        raise Invalid(f"No such fine-tuning job: '{value[:80]}'.", "fine_tuning_job_id", status=404,
                      code="job_not_found")
    return job


def _suggested_rate(job: Job) -> float:
    family = FAMILIES[job.spec.get("task", "sft")]
    return family.suggested.learning_rates.get(job.spec.get("method"), TrainChoices.defaults()["learning_rate"])


def _hyperparameters(job: Job) -> dict[str, Any]:
    spec = {**TrainChoices.defaults(), **job.spec}  # a spec stored before a setting existed has its default
    hyper = {"n_epochs": spec["epochs"] if not spec["max_steps"] else "auto", "batch_size": spec["batch_size"],
             "learning_rate_multiplier": round(spec["learning_rate"] / _suggested_rate(job), 6)}
    if spec.get("task") in PREFERENCE_TASKS:
        hyper["beta"] = spec.get("dpo_beta")
    return hyper


def _method_type(job: Job) -> str:
    task = job.spec.get("task", "sft")
    return task if task in PREFERENCE_TASKS else "supervised"


def _last_metric(job: Job) -> dict[str, Any]:
    event = job.events.filter(kind="metric").order_by("-seq").first()
    return event.data if event else {}


def _estimated_finish(job: Job) -> int | None:
    if job.state not in RUNNING_STATES or not job.started_at or not job.step or not job.total_steps:
        return None
    elapsed = (timezone.now() - job.started_at).total_seconds()
    return int(job.started_at.timestamp() + elapsed * job.total_steps / job.step)


def job_object(job: Job) -> dict[str, Any]:
    spec = job.spec
    kind = _method_type(job)
    hyper = _hyperparameters(job)
    tokens = _last_metric(job).get("tokens") if job.state == SUCCEEDED else None
    return {
        "id": api_job_id(job), "object": "fine_tuning.job", "created_at": int(job.created_at.timestamp()),
        "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None,
        "model": models_api.base_label(job), "organization_id": f"user-{job.owner.username}",
        "fine_tuned_model": models_api.model_name(job) if job.state == SUCCEEDED else None,
        "status": STATUS[job.state], "hyperparameters": hyper,
        "method": {"type": kind, kind: {"hyperparameters": hyper}},
        "training_file": files.file_id(job.dataset),
        "validation_file": files.file_id(job.validation_dataset) if job.validation_dataset_id else None,
        "result_files": files.result_files(job), "trained_tokens": tokens, "seed": spec.get("seed"),
        "estimated_finish": _estimated_finish(job), "integrations": [], "metadata": job.metadata or None,
        "suffix": job.suffix or None, "user_provided_suffix": job.suffix or None,
        "error": {"code": "job_failed", "message": job.message, "param": None} if job.state == "failed" else None,
        "specialist": {
            "name": job.name, "task": spec.get("task"), "state": job.state, "step": job.step,
            "total_steps": job.total_steps, "url": job.get_absolute_url(),
            **{key: spec.get(key) for key in ("method", "lora_r", "lora_alpha", "lora_target_modules", "learning_rate",
                                              "epochs", "max_steps", "batch_size", "max_seq_length")},
            "metrics_before": job.result.get("metrics_before"), "metrics_after": job.result.get("metrics_after"),
        },
    }


# Views --------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@api_key_required
def jobs(request: HttpRequest) -> HttpResponse:
    try:
        return _create(request) if request.method == "POST" else _list(request)
    except (Invalid, PagingError) as problem:
        return problem.response()


def _create(request: HttpRequest) -> JsonResponse:
    job_request = JobRequest(request.user, _body(request))
    data = job_request.form_data()
    with transaction.atomic():
        dataset = job_request.dataset
        if dataset.status == REVIEW:
            dataset.accept_dropped_rows()  # asked for with specialist.accept_rejected_rows
        form = JobForm(data, user=request.user)
        if not form.is_valid():
            transaction.set_rollback(True)
            raise _form_error(form, job_request)
        spec = form.spec_dict()
        if job_request.seed is not None:
            spec["seed"] = job_request.seed
        if job_request.validation is not None:
            spec["validation_path"] = str(job_request.validation.rows_path)
        job = Job.start(request.user, dataset, spec, name=form.cleaned_data["name"] or
                        f"{dataset.name} · {job_request.suffix or form.choices.method}",
                        suffix=job_request.suffix, metadata=job_request.metadata,
                        validation_dataset=job_request.validation)
    return JsonResponse(job_object(job))


def _list(request: HttpRequest) -> JsonResponse:
    rows = Job.objects.filter(owner=request.user, kind=TRAIN).select_related("owner", "dataset", "validation_dataset")
    for name, value in request.GET.items():
        match = re.fullmatch(r"metadata\[(.+)\]", name)
        if match:
            rows = rows.filter(**{f"metadata__{match.group(1)}": value})
        elif name not in ("after", "limit"):
            raise Invalid(f"Unknown query parameter '{name[:40]}'; use after, limit or metadata[key]=value.", name)
    page = page_of(request, rows, prefix=JOB_PREFIX)
    return JsonResponse(page.body([job_object(job) for job in page.items]))


@require_GET
@api_key_required
def one_job(request: HttpRequest, fine_tuning_job: str) -> JsonResponse:
    try:
        return JsonResponse(job_object(_job_of(request.user, fine_tuning_job)))
    except Invalid as problem:
        return problem.response()


@require_POST
@api_key_required
def cancel(request: HttpRequest, fine_tuning_job: str) -> JsonResponse:
    try:
        job = _job_of(request.user, fine_tuning_job)
    except Invalid as problem:
        return problem.response()
    if not job.transition(CANCELLED, message="Cancelled through the API."):
        return error(400, f"The job is already {job.state}; only a queued or running job can be cancelled.",
                     param="fine_tuning_job_id", code="invalid_state")
    return JsonResponse(job_object(job))


@require_GET
@api_key_required
def events(request: HttpRequest, fine_tuning_job: str) -> JsonResponse:
    """The job's history, newest first: states and logs as messages, each step's training loss and
    each held-out evaluation as metrics (their numbers in `data`)."""
    try:
        job = _job_of(request.user, fine_tuning_job)
        page = page_of(request, JobEvent.objects.filter(job=job), prefix=EVENT_PREFIX)
    except (Invalid, PagingError) as problem:
        return problem.response()
    return JsonResponse(page.body([event_object(event) for event in page.items]))


def event_object(event: JobEvent) -> dict[str, Any]:
    data, kind = event.data, event.kind
    created = int(data.get("t", 0))
    body: dict[str, Any] = {"id": f"{EVENT_PREFIX}{event.id}", "object": "fine_tuning.job.event",
                            "created_at": created, "level": "info", "type": "message", "data": {}}
    if kind == "metric":
        numbers = {"step": event.step, "train_loss": data.get("loss"), "total_steps": data.get("total_steps"),
                   **{k: data[k] for k in ("learning_rate", "grad_norm", "epoch", "tokens") if k in data}}
        body.update(type="metrics", data=numbers,
                    message=f"Step {event.step}/{data.get('total_steps', '?')}: training loss={data.get('loss', 0):.4f}")
    elif kind == "eval":
        numbers = {k: v for k, v in data.items() if isinstance(v, int | float) and k not in ("step", "t")}
        if "eval_loss" in numbers:
            numbers["valid_loss"] = numbers["eval_loss"]
        label = "before training" if data.get("baseline") else "after training" if data.get("final") else \
            f"at step {event.step}"
        shown = ", ".join(f"{k}={v:.4g}" for k, v in numbers.items() if k != "valid_loss")
        body.update(type="metrics", data={"step": event.step, **numbers}, message=f"Held-out metrics {label}: {shown}")
    elif kind == "state":
        state = data.get("state", "")
        shown = STATUS.get(state, state)
        body.update(message=data.get("message") or (f"Job {shown}" if shown == state else f"Job {shown} ({state})"),
                    level="error" if state == "failed" else "info")
    elif kind == "log":
        body["message"] = data.get("message", "")
        body["level"] = "warn" if data.get("level") == "warning" else "info"
    elif kind == "params":
        body["message"] = f"Trainable parameters: {data.get('trainable', '?')} of {data.get('total', '?')}"
    else:
        body["message"] = data.get("message") or kind
    return body


@require_GET
@api_key_required
def checkpoints(request: HttpRequest, fine_tuning_job: str) -> JsonResponse:
    """The model a job keeps: its final one, servable by name (the in-between checkpoints are for
    resuming and are deleted when the job ends)."""
    try:
        job = _job_of(request.user, fine_tuning_job)
    except Invalid as problem:
        return problem.response()
    if job.state != SUCCEEDED:
        return JsonResponse({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})
    final = job.events.filter(kind="eval").order_by("-seq").first()
    metrics = {k: v for k, v in (final.data if final else {}).items() if isinstance(v, int | float) and k != "t"}
    metrics.update(step=job.step, train_loss=job.last_loss, **({"valid_loss": metrics["eval_loss"]}
                                                               if "eval_loss" in metrics else {}))
    checkpoint = {
        "id": f"{CHECKPOINT_PREFIX}{job.id}-{job.step}", "object": "fine_tuning.job.checkpoint",
        "created_at": int(job.finished_at.timestamp()), "fine_tuned_model_checkpoint": models_api.model_name(job),
        "fine_tuning_job_id": api_job_id(job), "metrics": metrics, "step_number": job.step,
    }
    return JsonResponse({"object": "list", "data": [checkpoint], "has_more": False,
                         "first_id": checkpoint["id"], "last_id": checkpoint["id"]})
