"""The models of the sentence-transformers recipes (rerank: a CrossEncoder, embed: a
SentenceTransformer): the base loaded from its local folder in fp32, and the trained model saved
as a folder its class loads as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch

from worker.artifacts import write_card_and_spec
from worker.errors import UserError
from worker.families import FAMILIES
from worker.models import resolve_encoder
from worker.spec import TrainSpec

Model = TypeVar("Model")


def load(kind: type[Model], spec: TrainSpec, purpose: str, described: str, **options: Any) -> Model:
    """spec's base as a `kind` (CrossEncoder or SentenceTransformer, with `options`), reading at
    most spec.max_seq_length tokens. `purpose` ("a reranker") and `described` ("a cross-encoder")
    name it in the error messages."""
    path = resolve_encoder(spec, purpose)
    try:
        model = kind(
            path,
            trust_remote_code=False,
            local_files_only=True,
            model_kwargs={"dtype": torch.float32, "use_safetensors": True},
            **options,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"Could not load {spec.base_model} as {described}: {exc}") from exc
    model.max_seq_length = min(spec.max_seq_length, model.max_seq_length)
    return model


def export(model: Any, spec: TrainSpec, metrics: dict[str, Any], out_dir: Path, usage: str) -> Path:
    """A folder the model's class loads as is (LoRA merged into the weights first), with the spec
    and the card (`usage`: its how-to-use section)."""
    transformer = model[0]
    if spec.method == "lora":
        transformer.model = transformer.model.merge_and_unload()
    model.save(str(out_dir), create_model_card=False, safe_serialization=True)
    write_card_and_spec(out_dir, spec, {**metrics, "library": "sentence-transformers"}, usage)
    return out_dir


def save(setup: Any, metrics_before: dict, metrics_after: dict, step: int, usage: str) -> dict[str, Any]:
    """Export the trained model to final/ and report it; the job's result. `setup` is the
    recipe's (spec, reporter, model, progress)."""
    spec, reporter = setup.spec, setup.reporter
    reporter.state("exporting")
    result = {
        "train_loss": setup.progress.last_loss,
        "steps": step,
        "primary_metric": FAMILIES[spec.task].primary_metric,
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
    }
    artifact_dir = export(setup.model, spec, result, Path(spec.output_dir) / "final", usage)
    reporter.artifact(str(artifact_dir), method=spec.method, **result)
    return {**result, "artifact_dir": str(artifact_dir)}
