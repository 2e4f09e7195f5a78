"""The models of the sentence-transformers recipes (rerank: a CrossEncoder, embed: a
SentenceTransformer): the base loaded from its local folder in fp32, and the trained model saved
as a folder its class loads as is.

A LoRA job's folder also holds the unmerged adapter in ADAPTER_SUBDIR (save_adapter, which the
classify recipe uses too), so one loaded base can serve many fine-tunes."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from worker.artifacts import _point_adapter_at_base, make_readable, write_card_and_spec
from worker.errors import UserError
from worker.families import FAMILIES
from worker.models import resolve_encoder
from worker.progress import report_baseline
from worker.snapshots import Snapshots
from worker.spec import TrainSpec

Model = TypeVar("Model")

ADAPTER_SUBDIR = "adapter"
"""The subfolder of an encoder-family LoRA artifact that holds the unmerged peft adapter."""
ADAPTER_NOTE = (
    f"{ADAPTER_SUBDIR}/ holds the same fine-tune as an unmerged LoRA adapter (peft), for serving many "
    "fine-tunes on one base."
)
"""The model card's sentence about that subfolder."""


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


def measure_baseline(setup: Any) -> dict[str, Any]:
    """The untouched model's held-out metrics with its forgetting (step 0's eval event; {} when
    nothing is held out), and its probe similarities, the base the forgetting meter compares with.
    `setup` is the recipe's (reporter, evaluate, forgetting)."""
    if setup.evaluate is None:
        return {"metrics": {}, "probe": None}
    metrics = report_baseline(setup.reporter, lambda: setup.evaluate() | setup.forgetting())
    return {"metrics": metrics, "probe": setup.forgetting.base}


def export(model: Any, spec: TrainSpec, metrics: dict[str, Any], out_dir: Path, usage: str) -> Path:
    """A folder the model's class loads as is (LoRA merged into the weights first, the unmerged
    adapter kept in ADAPTER_SUBDIR), with the spec and the card (`usage`: its how-to-use section)."""
    transformer = model[0]
    if spec.method == "lora":
        save_adapter(transformer.model, spec, out_dir)
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
    write = partial(_export_to, spec=spec, usage=usage)
    checkpoints = Snapshots(spec).export(setup.model, step, metrics_after, result, write, merges=spec.method == "lora")
    artifact_dir = write(setup.model, Path(spec.output_dir) / "final", result)
    reporter.artifact(str(artifact_dir), method=spec.method, **result)
    return {**result, "artifact_dir": str(artifact_dir), "checkpoints": checkpoints}


def _export_to(model: Any, out_dir: Path, metrics: dict[str, Any], spec: TrainSpec, usage: str) -> Path:
    return export(model, spec, metrics, out_dir, usage)


def save_adapter(peft_model: Any, spec: TrainSpec, out_dir: Path) -> Path:
    """Save `peft_model`'s adapter, unmerged, to out_dir/ADAPTER_SUBDIR (adapter_config.json naming
    the portable base, adapter_model.safetensors with any modules_to_save head); before merging."""
    adapter_dir = Path(out_dir) / ADAPTER_SUBDIR
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    _point_adapter_at_base(adapter_dir / "adapter_config.json", spec)
    # peft's own card names the worker's local base folder; the artifact's README.md covers it.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    make_readable(adapter_dir)
    return adapter_dir
