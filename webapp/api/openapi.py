"""The OpenAPI 3.1 description of everything under /v1, served at /v1/openapi.json.

Written out by hand, close to the code it describes (tests/test_api_fine_tuning.py checks that
every /v1 route of the URLconf is described, and nothing else)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from webapp.api.auth import api_view
from webapp.exports.models import KINDS as EXPORT_KINDS
from worker.families import FAMILIES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {str(code): {"$ref": f"#/components/responses/{name}"} for code, name in (
    (400, "BadRequest"), (401, "Unauthorized"), (404, "NotFound"), (429, "RateLimited"))}


def _operation(summary: str, response: dict[str, Any], *, body: dict[str, Any] | None = None,
               parameters: list[dict[str, Any]] = (), tag: str, description: str = "") -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {"200": response, **ERRORS}}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = list(parameters)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    return operation


def _path_param(name: str, example: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "example": example}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PAGING = [_query("after", {"type": "string"}, "The id of the last object of the previous page."),
          _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Objects per page.")]


def _list_of(item: str) -> dict[str, Any]:
    return {"type": "object", "required": ["object", "data", "has_more"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref(item)}, "has_more": {"type": "boolean"},
        "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]}}}


def _model_call(summary: str, request: str, response: str, tag: str, description: str) -> dict[str, Any]:
    return {"post": _operation(summary, _json(_ref(response)), body={"application/json": {"schema": _ref(request)}},
                               tag=tag, description=description)}


def _hyperparameters() -> dict[str, Any]:
    auto_or = lambda schema: {"oneOf": [{"const": "auto"}, schema]}  # noqa: E731
    return {"type": "object", "additionalProperties": False, "properties": {
        "n_epochs": auto_or({"type": "integer", "minimum": 1}),
        "batch_size": auto_or({"type": "integer", "minimum": 1}),
        "learning_rate_multiplier": auto_or({"type": "number", "exclusiveMinimum": 0}),
        "beta": auto_or({"type": "number", "exclusiveMinimum": 0}),
    }}


def _specialist_settings() -> dict[str, Any]:
    properties: dict[str, Any] = {
        "task": {"enum": list(FAMILIES), "description": "Must be the training file's task."},
        "name": {"type": "string", "maxLength": 200},
        "method": {"enum": ["lora", "qlora", "full", "head"]},
        "lora_r": {"type": "integer", "minimum": 1}, "lora_alpha": {"type": "integer", "minimum": 1},
        "lora_dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "lora_target_modules": {"type": "array", "items": {"type": "string"}},
        "use_dora": {"type": "boolean"},
        "learning_rate": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "max_steps": {"type": ["integer", "null"], "minimum": 1},
        "max_seq_length": {"type": "integer", "minimum": 8},
        "validation_fraction": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "loss_on_turns": {"enum": ["all", "last"]}, "dpo_sft_weight": {"type": "number", "minimum": 0},
        "gradient_checkpointing": {"type": "boolean"}, "drop_validation_overlap": {"type": "boolean"},
        "accept_rejected_rows": {"type": "boolean", "description": "Train a file some of whose rows could not be "
                                                                   "read on the rest."},
    }
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": "Specialist's own settings (the official client sends them with extra_body)."}


def _schemas() -> dict[str, Any]:
    text = {"type": "string"}
    error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
        "message": text, "type": text, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    return {
        "Error": error,
        "Model": {"type": "object", "properties": {"id": text, "object": {"const": "model"},
                                                   "created": {"type": "integer"}, "owned_by": text}},
        "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
            "model": text, "messages": {"type": "array", "items": {"type": "object"}}, "stream": {"type": "boolean"},
            "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
            "temperature": {"type": "number"}, "top_p": {"type": "number"}, "seed": {"type": "integer"},
            "stop": {"oneOf": [text, {"type": "array", "items": text}]}, "n": {"const": 1},
            "tools": {"type": "array", "items": {"type": "object"}}, "tool_choice": {"enum": ["auto", "none"]}}},
        "ChatCompletion": {"type": "object", "description": "OpenAI's chat.completion (or, streaming, "
                                                            "chat.completion.chunk server-sent events)."},
        "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": text, "input": {"oneOf": [text, {"type": "array", "items": text}]},
            "encoding_format": {"enum": ["float", "base64"]}}},
        "Embeddings": {"type": "object", "description": "OpenAI's list of embedding objects with usage."},
        "RerankRequest": {"type": "object", "required": ["model", "query", "documents"], "properties": {
            "model": text, "query": text, "documents": {"type": "array", "items": text},
            "top_n": {"type": "integer"}}},
        "Rerank": {"type": "object", "description": "vLLM's / Cohere's rerank response: results with index and "
                                                    "relevance_score, best first."},
        "ClassifyRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": text, "input": {"oneOf": [text, {"type": "array", "items": text}]}}},
        "Classification": {"type": "object", "description": "vLLM's classify response: per input the label and "
                                                            "the probability of each label."},
        "File": {"type": "object", "properties": {
            "id": text, "object": {"const": "file"}, "bytes": {"type": "integer"}, "created_at": {"type": "integer"},
            "filename": text, "purpose": {"enum": ["fine-tune", "fine-tune-results"]},
            "status": {"enum": ["uploaded", "processed", "error"]}, "status_details": {"type": ["string", "null"]},
            "specialist": {"type": "object", "description": "The reader's verdict: task, rows_total, rows_ok, the "
                                                            "first row errors (line, column, problem), the page."}}},
        "FileUpload": {"type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"}, "purpose": {"const": "fine-tune"},
            "task": {"enum": list(FAMILIES), "description": "Specialist: what the file is for; proposed from its "
                                                            "columns when left out."},
            "name": text}},
        "Deleted": {"type": "object", "properties": {"id": text, "object": text, "deleted": {"type": "boolean"}}},
        "Hyperparameters": _hyperparameters(),
        "SpecialistSettings": _specialist_settings(),
        "FineTuningJobRequest": {"type": "object", "required": ["model", "training_file"], "properties": {
            "model": {"type": "string", "description": "A catalog key or ft:... of one of your full fine-tunes."},
            "training_file": text, "validation_file": {"type": ["string", "null"]},
            "suffix": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}, "seed": {"type": "integer"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 512},
                         "maxProperties": 16},
            "method": {"type": "object", "required": ["type"], "properties": {
                "type": {"enum": ["supervised", "dpo", "kto"]},
                **{kind: {"type": "object", "properties": {"hyperparameters": _ref("Hyperparameters")}}
                   for kind in ("supervised", "dpo", "kto")}}},
            "hyperparameters": _ref("Hyperparameters"), "specialist": _ref("SpecialistSettings")}},
        "FineTuningJob": {"type": "object", "properties": {
            "id": text, "object": {"const": "fine_tuning.job"}, "created_at": {"type": "integer"},
            "finished_at": {"type": ["integer", "null"]}, "model": text, "fine_tuned_model": {"type": ["string", "null"]},
            "status": {"enum": ["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]},
            "hyperparameters": _ref("Hyperparameters"), "method": {"type": "object"}, "training_file": text,
            "validation_file": {"type": ["string", "null"]}, "result_files": {"type": "array", "items": text},
            "trained_tokens": {"type": ["integer", "null"]}, "seed": {"type": "integer"},
            "estimated_finish": {"type": ["integer", "null"]}, "metadata": {"type": ["object", "null"]},
            "error": {"type": ["object", "null"]}, "specialist": {"type": "object"}}},
        "FineTuningJobEvent": {"type": "object", "properties": {
            "id": text, "object": {"const": "fine_tuning.job.event"}, "created_at": {"type": "integer"},
            "level": {"enum": ["info", "warn", "error"]}, "message": text, "type": {"enum": ["message", "metrics"]},
            "data": {"type": "object"}}},
        "Export": {"type": "object", "properties": {
            "id": text, "object": {"const": "fine_tuning.job.export"}, "fine_tuning_job_id": text,
            "kind": {"enum": list(EXPORT_KINDS)}, "state": {"enum": ["queued", "building", "ready", "failed"]},
            "message": text, "size_bytes": {"type": ["integer", "null"]}, "filename": {"type": ["string", "null"]},
            "download_url": {"type": ["string", "null"]}}},
        "FineTuningJobCheckpoint": {"type": "object", "properties": {
            "id": text, "object": {"const": "fine_tuning.job.checkpoint"}, "created_at": {"type": "integer"},
            "fine_tuned_model_checkpoint": text, "fine_tuning_job_id": text, "metrics": {"type": "object"},
            "step_number": {"type": "integer"}}},
    }


def document(server: str = "/") -> dict[str, Any]:
    job = [_path_param("fine_tuning_job_id", "ftjob-12")]
    file = [_path_param("file_id", "file-3")]
    paths = {
        "/v1/models": {"get": _operation("The models you may call: the catalog, then your fine-tunes",
                                         _json(_list_of("Model")), tag="Models")},
        "/v1/models/{model}": {"get": _operation("One model", _json(_ref("Model")),
                                                 parameters=[_path_param("model", "smollm2-135m-instruct")],
                                                 tag="Models")},
        "/v1/chat/completions": _model_call("Chat with a base or a fine-tune", "ChatCompletionRequest",
                                            "ChatCompletion", "Serving", "Streams with stream=true; tools as OpenAI."),
        "/v1/embeddings": _model_call("Embed text", "EmbeddingRequest", "Embeddings", "Serving", ""),
        "/v1/rerank": _model_call("Rank documents for a query", "RerankRequest", "Rerank", "Serving", ""),
        "/v1/classify": _model_call("Classify text", "ClassifyRequest", "Classification", "Serving", ""),
        "/v1/files": {
            "get": _operation("Your files, newest first", _json(_list_of("File")), tag="Files", parameters=[
                *PAGING, _query("order", {"enum": ["asc", "desc"]}, "By creation."),
                _query("purpose", {"type": "string"}, "fine-tune")]),
            "post": _operation("Upload a dataset", _json(_ref("File")), tag="Files",
                               body={"multipart/form-data": {"schema": _ref("FileUpload")}},
                               description="Read by the same reader as the upload form: status and status_details "
                                           "carry its verdict, row errors included."),
        },
        "/v1/files/{file_id}": {
            "get": _operation("One file", _json(_ref("File")), parameters=file, tag="Files"),
            "delete": _operation("Delete a file no job uses", _json(_ref("Deleted")), parameters=file, tag="Files"),
        },
        "/v1/files/{file_id}/content": {"get": _operation(
            "The file as uploaded (a result file: step metrics as CSV)",
            {"description": "The bytes", "content": {"application/octet-stream": {}}}, parameters=file, tag="Files")},
        "/v1/fine_tuning/jobs": {
            "get": _operation("Your jobs, newest first", _json(_list_of("FineTuningJob")), tag="Fine-tuning",
                              parameters=[*PAGING, _query("metadata", {"type": "object"}, "metadata[key]=value")]),
            "post": _operation("Start a job", _json(_ref("FineTuningJob")), tag="Fine-tuning",
                               body={"application/json": {"schema": _ref("FineTuningJobRequest")}},
                               description="Left out or 'auto': the settings the new-job form suggests for the "
                                           "file's task."),
        },
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}": {
            "get": _operation("One job", _json(_ref("FineTuningJob")), parameters=job, tag="Fine-tuning")},
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel": {
            "post": _operation("Cancel a queued or running job (400 when it has ended)", _json(_ref("FineTuningJob")),
                               parameters=job, tag="Fine-tuning")},
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events": {
            "get": _operation("The job's events, newest first", _json(_list_of("FineTuningJobEvent")),
                              parameters=[*job, *PAGING], tag="Fine-tuning")},
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints": {
            "get": _operation("The model the job keeps", _json(_list_of("FineTuningJobCheckpoint")),
                              parameters=job, tag="Fine-tuning")},
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports": {
            "get": _operation("The job's exports", _json(_list_of("Export")), parameters=job, tag="Exports"),
            "post": _operation("Ask for an export (made once; asking again returns it)", _json(_ref("Export")),
                               parameters=job, tag="Exports", body={"application/json": {"schema": {
                                   "type": "object", "required": ["kind"],
                                   "properties": {"kind": {"enum": list(EXPORT_KINDS)}}}}})},
        "/v1/exports/{export_id}/content": {"get": _operation(
            "Download a ready export (a zip with a model card)",
            {"description": "The zip", "content": {"application/zip": {}}},
            parameters=[_path_param("export_id", "export-4")], tag="Exports")},
        "/v1/openapi.json": {"get": _operation("This description", _json({"type": "object"}), tag="Meta")},
    }
    responses = {name: _json(_ref("Error"), text) for name, text in (
        ("BadRequest", "The request is wrong; error.param names the parameter"),
        ("Unauthorized", "No API key, or not a valid one"), ("NotFound", "Not found, or not yours"),
        ("RateLimited", "Too many requests this minute (Retry-After)"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Specialist API", "version": "1",
                 "description": "OpenAI-compatible fine-tuning and serving. Send your key (the account page) as "
                                "Authorization: Bearer <key>."},
        "servers": [{"url": server}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": _schemas(), "responses": responses,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@require_GET
@api_view
async def description(request: HttpRequest) -> JsonResponse:
    return JsonResponse(document(request.build_absolute_uri("/")))
