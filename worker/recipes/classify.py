"""Text classification and text-pair classification: one label for a text, or for a pair of texts.

setup → train → save, on transformers' Trainer.

- Data: JSONL rows {"text", "label"} (task classify) or {"text_a", "text_b", "label"} (task pair:
  a claim and its context, a premise and a hypothesis, ...). The labels are the distinct values
  of the label column (surrounding spaces trimmed), sorted; the saved config names them.
- Model: AutoModelForSequenceClassification on the base, with a new head. Encoders (BERT) read
  the pooled first token, decoders (llama) the last token. A pair is encoded the tokenizer's
  way (BERT: [CLS] a [SEP] b [SEP]), exactly as a transformers pipeline encodes
  {"text": a, "text_pair": b}; a decoder's tokenizer simply joins the two texts.
- Methods: full (every weight), head (the base stays frozen, only the head learns), lora
  (adapters plus the head, merged into the weights at export: the artifact is a plain
  classifier either way; a LoRA artifact also keeps the unmerged adapter, the head in its
  modules_to_save, in its adapter/ subfolder).
- Split: stratified by label and seeded, so every label keeps its share of held-out rows, and
  grouped by input, so a text (or pair) repeated in the file is never both trained on and held out.
- Held-out metrics at step 0 (the untouched model), every eval_every steps and at the end:
  accuracy (the primary metric), macro F1, the confusion matrix (rows: true label, columns:
  predicted), the cross-entropy loss, and with exactly two labels the F1 of the positive label
  and AUROC. The positive label is the one that reads as "yes" (see POSITIVE_NAMES) when
  exactly one does, else the second in sorted order.
- `forgetting` with them: how far the network under the head moved on general text
  (worker.encoder_forgetting; the base's probe similarities are kept with the baseline).
- The baseline and the final evaluation run in fp32 without autocast, so eval_predictions.json
  holds what the exported model predicts; the evaluations during training run as training
  does (bf16 autocast where the hardware has it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from worker import training
from worker.artifacts import artifact_name, write_card_and_spec
from worker.checkpointing import Checkpointing
from worker.checkpoints import resume_or_measure
from worker.encoder_forgetting import ForgettingMeter
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.models import apply_method, load_sequence_classifier
from worker.params import census
from worker.progress import ReportProgress
from worker.rows import read_rows as read_jsonl_rows
from worker.rows import stratified_split, validation_split
from worker.sentence_models import ADAPTER_NOTE, save_adapter
from worker.snapshots import Snapshots
from worker.spec import TrainSpec

FIELDS = {key: FAMILIES[key].required for key in ("classify", "pair")}
# Label names that read as "yes": the positive label of a two-label task when exactly one is here.
POSITIVE_NAMES = {"yes", "true", "1", "positive", "supported", "entailment", "entailed", "faithful", "relevant", "correct"}  # fmt: skip
PRIMARY_METRIC = FAMILIES["classify"].primary_metric


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = measure_baseline(setup)
    setup.forgetting.keep_base(baseline.get("probe"))
    step = training.train(setup.trainer, resume_from, reporter)
    metrics_after, confusion_after = evaluate_after_training(setup, step)
    return save(setup, baseline, metrics_after, confusion_after, step)


@dataclass
class Setup:
    """What one classification run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: Trainer
    progress: ReportProgress
    labels: list[str]
    max_length: int
    """The tokens a text (or a pair) is cut to: the spec's, or less where the model reads less."""
    held_out: list[dict]
    """The held-out rows as read; empty when nothing is held out (no metrics)."""
    evaluate: Any
    """(forgetting) → (metrics, confusion, probabilities) of the model on the held-out rows, the
    metrics with those of `forgetting`, the meter or its if_affordable (evaluate_rows)."""
    forgetting: ForgettingMeter


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The rows, the base model with a new head and its method applied, and a Trainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    train_rows, held_out, labels = prepare_rows(spec)
    reporter.log(
        f"{len(train_rows)} training rows, {len(held_out)} validation rows; {len(labels)} labels: {', '.join(labels)}."
    )
    model, tokenizer = load_sequence_classifier(spec, labels)
    max_length = min(spec.max_seq_length, getattr(model.config, "max_position_embeddings", None) or spec.max_seq_length)
    encode = partial(encode_rows, tokenizer=tokenizer, labels=labels, max_length=max_length, task=spec.task)
    train_examples, eval_examples = encode(train_rows), encode(held_out)
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    collate = DataCollatorWithPadding(tokenizer)
    forgetting = ForgettingMeter(lambda: model, tokenizer)
    evaluate = partial(evaluate_rows, model, eval_examples, collate, labels, spec.batch_size)
    during_training = (lambda: eval_values(*evaluate(forgetting.if_affordable)[:2])) if held_out else None
    progress = ReportProgress(reporter, during_training, spec.eval_every)
    trainer = Trainer(
        model=model,
        args=training_arguments(spec),
        train_dataset=train_examples,
        data_collator=collate,
        callbacks=[progress, Checkpointing(spec, reporter)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout
    return Setup(
        spec, reporter, model, tokenizer, trainer, progress, labels, max_length, held_out, evaluate, forgetting
    )


def training_arguments(spec: TrainSpec) -> TrainingArguments:
    return training.arguments(
        spec, train_sampling_strategy="group_by_length", remove_unused_columns=False, label_names=["labels"],
        include_num_input_tokens_seen="non_padding",  # each step's metric event counts the tokens trained on
    )


def measure_baseline(setup: Setup) -> tuple[str | None, dict[str, Any]]:
    """(the checkpoint to resume from, or None; the untouched model's metrics, confusion matrix
    and probe similarities): a resumed job keeps the one its first attempt measured."""
    return resume_or_measure(setup.spec, setup.reporter, partial(held_out_baseline, setup))


def held_out_baseline(setup: Setup) -> dict[str, Any]:
    if not setup.held_out:
        setup.reporter.log("No rows are held out (validation fraction 0, or one row per label): no metrics.")
        return {"metrics": {}, "confusion": None, "probe": None}
    metrics, confusion = setup.evaluate(setup.forgetting)[:2]
    setup.reporter.eval(0, baseline=True, **eval_values(metrics, confusion))
    return {"metrics": metrics, "confusion": confusion, "probe": setup.forgetting.base}


def evaluate_after_training(setup: Setup, step: int) -> tuple[dict[str, float], dict | None]:
    """The held-out metrics and confusion matrix ({} and None when nothing is held out), and
    eval_predictions.json."""
    # The final metrics and predictions are those of the plain fp32 model that is exported.
    training.without_autocast(setup.trainer, setup.model)
    metrics, confusion, probabilities = {}, None, []
    if setup.held_out:
        setup.reporter.state("evaluating")
        metrics, confusion, probabilities = setup.evaluate(setup.forgetting)
        setup.reporter.eval(step, final=True, **eval_values(metrics, confusion))
    write_predictions(
        Path(setup.spec.output_dir) / "eval_predictions.json", setup.held_out, setup.labels, probabilities
    )
    return metrics, confusion


def save(setup: Setup, baseline: dict, after: dict, confusion_after: dict | None, step: int) -> dict[str, Any]:
    """The artifact folder; the job's result."""
    spec, train_loss = setup.spec, setup.progress.last_loss
    setup.reporter.state("exporting")
    metrics = {"train_loss": train_loss, "steps": step, "metrics_before": baseline["metrics"], "metrics_after": after}
    out_dir = Path(spec.output_dir) / "final"
    write = partial(_export_to, setup)
    checkpoints = Snapshots(spec).export(setup.model, step, after, metrics, write, merges=spec.method == "lora")
    artifact_dir = write(setup.model, out_dir, metrics)
    setup.reporter.artifact(str(artifact_dir), method=spec.method, train_loss=train_loss, steps=step, **after)
    return {
        **metrics,
        "artifact_dir": str(artifact_dir),
        "primary_metric": PRIMARY_METRIC,
        "confusion_before": baseline["confusion"],
        "confusion_after": confusion_after,
        "labels": setup.labels,
        "checkpoints": checkpoints,
    }


def _export_to(setup: Setup, model, out_dir: Path, metrics: dict) -> Path:
    return export(model, setup.tokenizer, setup.spec, metrics, setup.labels, setup.max_length, out_dir)


# Data -----------------------------------------------------------------------------------------


def prepare_rows(spec: TrainSpec) -> tuple[list[dict], list[dict], list[str]]:
    """(training rows, held-out rows, label names): the held-out rows are the uploaded validation
    file's when there is one, else a stratified share of the dataset."""
    rows = read_rows(Path(spec.dataset_path), FIELDS[spec.task])
    if not spec.validation_path:
        return *stratified_split(rows, spec.validation_fraction, spec.seed), label_names(rows)
    validation = read_rows(Path(spec.validation_path), FIELDS[spec.task], "the validation file")
    rows, held_out = validation_split(rows, validation, spec.drop_validation_overlap)
    labels = label_names(rows)
    for number, row in enumerate(validation, start=1):
        if row["label"] not in labels:
            raise UserError(
                f"Row {number} of the validation file has the label {row['label']!r}, which no training row has; "
                f"the model can only learn the training labels ({', '.join(labels)}). Fix the label or add "
                "training rows with it."
            )
    return rows, held_out, labels


def read_rows(path: Path, fields: tuple[str, ...], source: str = "the dataset") -> list[dict[str, str]]:
    """The rows of `path` with their `fields` (all text); labels trimmed of surrounding spaces."""

    def keep(row: dict, where: str) -> dict[str, str]:
        return {name: row[name] for name in fields} | {"label": row["label"].strip()}

    return read_jsonl_rows(path, fields, source, keep, fields_named=", ".join(fields))


def label_names(rows: list[dict[str, str]]) -> list[str]:
    labels = sorted({row["label"] for row in rows})
    if len(labels) < 2:
        raise UserError(f"The label column has only one class ({labels[0]!r}); a classifier needs at least two.")
    return labels


def encode_rows(rows: list[dict], tokenizer, labels: list[str], max_length: int, task: str) -> list[dict]:
    label_ids = {label: index for index, label in enumerate(labels)}
    return [encode_row(row, tokenizer, label_ids, max_length, task) for row in rows]


def encode_row(row: dict[str, str], tokenizer, label_ids: dict[str, int], max_length: int, task: str) -> dict:
    """Token ids (the pipeline's encoding, truncated to max_length) and the label's index."""
    texts = (row["text_a"], row["text_b"]) if task == "pair" else (row["text"],)
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    return {**encoded, "labels": label_ids[row["label"]]}


# Evaluation -----------------------------------------------------------------------------------


def evaluate_rows(model, examples: list[dict], collate, labels: list[str], batch_size: int, forgetting):
    """(metrics, confusion, probabilities) of `model` on the encoded held-out `examples`; the
    metrics also carry the values of `forgetting` (a ForgettingMeter or its if_affordable)."""
    probabilities, loss = predict(model, examples, collate, batch_size)
    gold = [example["labels"] for example in examples]
    metrics, confusion = classification_metrics(probabilities, gold, labels)
    return {**metrics, "eval_loss": loss, **forgetting()}, confusion, probabilities


def eval_values(metrics: dict[str, float], confusion: dict | None) -> dict[str, Any]:
    """An evaluation as an eval event's values."""
    return {**metrics, "confusion": confusion}


@torch.no_grad()
def predict(model, examples: list[dict], collate, batch_size: int) -> tuple[torch.Tensor, float]:
    """Class probabilities (fp32, dropout off) and the mean cross-entropy loss."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probabilities, loss = [], 0.0
    for start in range(0, len(examples), batch_size):
        batch = {key: value.to(device) for key, value in collate(examples[start : start + batch_size]).items()}
        gold = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += torch.nn.functional.cross_entropy(logits, gold, reduction="sum").item()
        probabilities.append(logits.softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(probabilities), loss / len(examples)


def classification_metrics(probabilities: torch.Tensor, gold: list[int], labels: list[str]) -> tuple[dict, dict]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    predicted = probabilities.argmax(-1).tolist()
    metrics = {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
    }
    if len(labels) == 2:
        positive = positive_label(labels)
        metrics["f1"] = float(f1_score(gold, predicted, pos_label=positive, average="binary", zero_division=0))
        if len(set(gold)) == 2:  # AUROC needs both labels among the held-out rows
            truth = [label == positive for label in gold]
            metrics["auroc"] = float(roc_auc_score(truth, probabilities[:, positive].numpy()))
    matrix = confusion_matrix(gold, predicted, labels=list(range(len(labels)))).tolist()
    return metrics, {"labels": labels, "matrix": matrix}


def positive_label(labels: list[str]) -> int:
    """Index of the positive one of two sorted labels: the one that reads as "yes" when exactly
    one does (supported / unsupported → supported), else the second (0 / 1 → 1)."""
    yes = [index for index, label in enumerate(labels) if label.lower() in POSITIVE_NAMES]
    return yes[0] if len(yes) == 1 else 1


def write_predictions(path: Path, rows: list[dict], labels: list[str], probabilities) -> None:
    """The held-out rows with the final model's label and probability per label."""
    predictions = [
        {**row, "predicted": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist(), strict=True))}
        for row, p in zip(rows, probabilities, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(predictions, indent=1) + "\n")


# Export ---------------------------------------------------------------------------------------


def export(model, tokenizer, spec: TrainSpec, metrics: dict, labels: list[str], max_length: int, out_dir: Path) -> Path:
    """The whole classifier (LoRA merged in, the unmerged adapter in adapter/), its tokenizer, the
    spec and the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.method == "lora":
        save_adapter(model, spec, out_dir)  # before merging: merging changes the base weights
        model = model.merge_and_unload()  # a plain classifier: users load it without peft
    model.save_pretrained(out_dir)  # config.json (with the label names) + model.safetensors
    tokenizer.model_max_length = max_length  # what truncation=True cuts to, as in training
    tokenizer.save_pretrained(out_dir)
    write_card_and_spec(out_dir, spec, {**metrics, "library": "transformers"}, usage(spec, labels))
    return out_dir


def usage(spec: TrainSpec, labels: list[str]) -> str:
    folder = artifact_name(spec)
    text = '{"text": "First text", "text_pair": "Second text"}' if spec.task == "pair" else '"Your text here"'
    notes = {
        "lora": f"Trained with LoRA (rank {spec.lora_r}{', DoRA' if spec.use_dora else ''}); the adapters "
        f"are merged into the weights, so this folder is a complete model and needs no peft. {ADAPTER_NOTE}",
        "head": "Only the classification head was trained; the rest of the model is the unchanged base.",
        "full": "Every weight was fine-tuned.",
    }
    return f"""```python
from transformers import pipeline

classifier = pipeline("text-classification", model="{folder}")  # this folder, unzipped
print(classifier({text}, truncation=True))  # the most likely label and its probability
print(classifier({text}, truncation=True, top_k=None))  # every label with its probability
```

Labels: {", ".join(f"`{label}`" for label in labels)}. {notes[spec.method]}"""
