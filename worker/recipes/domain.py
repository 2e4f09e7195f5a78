"""Domain adaptation: continued pre-training of a causal LM on raw domain text.

setup → baseline → train → final eval → save, on transformers' Trainer.

- Data: JSONL rows {"text"}, one document each (a .txt or .md upload, a member of a zip, a row of
  a text column). Whole documents are held out: a seeded share (worker.rows.split_rows: the same
  text twice is on one side), or the uploaded validation file's (worker.rows.validation_split).
- Packing: each document is tokenised (with the tokenizer's own special tokens, such as a BOS)
  and ends with the end-of-text token; the documents are laid end to end and cut into rows of
  exactly max_seq_length tokens (the last one padded). No attention crosses a document boundary:
  the position ids restart at 0 where a document, or a row's piece of one, starts, and without an
  attention mask transformers builds the block-diagonal causal mask from them
  (masking_utils.find_packed_sequence_indices; eager, SDPA and flash attention alike). A
  document longer than a row goes on in the next row as a new piece, without the text before it.
- The loss is on every token, except the first of each piece (nothing in its piece predicts it)
  and the padding.
- Held out: perplexity (the primary metric: exp of the mean loss per token over all held-out
  tokens) and eval_loss, of the untouched model (step 0), every eval_every steps and at the end;
  each held-out document's perplexity before and after goes to eval_predictions.json. The final
  evaluation runs in fp32 without autocast, as the exported model runs.
- The forgetting meter (worker.forgetting) rides along with every held-out evaluation:
  general_perplexity, general_kl and forgetting on the probe set, against the base's top-k kept
  with the baseline; and, for a base with a chat template, its answers to a few general prompts
  before and after (result["general_answers"]; a base without one answers nothing, the event log
  says so).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_callback import PrinterCallback

from worker import forgetting, training
from worker.artifacts import export
from worker.checkpointing import Checkpointing
from worker.checkpoints import resume_or_measure
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import generate_replies
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.progress import ReportProgress
from worker.rows import read_rows, split_rows, validation_split
from worker.snapshots import Snapshots
from worker.spec import TrainSpec

FIELDS = FAMILIES["domain"].required
PRIMARY_METRIC = FAMILIES["domain"].primary_metric
IGNORE_INDEX = -100  # label value the loss skips
EXCERPT_CHARS = 200  # of each held-out document, in eval_predictions.json


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = measure_baseline(setup)
    step = training.train(setup.trainer, resume_from, reporter)
    after = evaluate_after_training(setup, baseline, step)
    return save(setup, baseline, after, step)


@dataclass
class Packed:
    """Documents packed into rows of one length: what the model reads, and where each token is from."""

    input_ids: torch.Tensor
    """(rows, length) token ids."""
    position_ids: torch.Tensor
    """(rows, length): 0 where a piece of a document (or the padding) starts, then counting up."""
    labels: torch.Tensor
    """(rows, length): the token ids, IGNORE_INDEX on each piece's first token and on the padding."""
    document: torch.Tensor
    """(rows, length): the number (0-based) of the document each token is from; -1 for padding."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "position_ids": self.position_ids[index], "labels": self.labels[index]}

    @property
    def scored_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Setup:
    """What one domain-adaptation run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: Trainer
    progress: ReportProgress
    held_out: list[dict]
    """The held-out documents as read; empty when nothing is held out (no metrics)."""
    evaluate: Any
    """() → HeldOut: the model on the held-out documents (held_out_loss)."""
    general: forgetting.Reference | None = None
    """The base's top-k on the probe set (set with the baseline), what the forgetting meter compares with."""

    @property
    def answers(self) -> bool:
        """Whether the general prompts are answered: only through a chat template."""
        return bool(self.tokenizer.chat_template)

    def general_answers(self) -> list[str]:
        conversations = forgetting.general_conversations()
        return generate_replies(self.model, self.tokenizer, conversations, max_new_tokens=forgetting.ANSWER_TOKENS)

    def held_out_metrics(self) -> dict[str, float]:
        """An evaluation's values: the held-out documents' and the forgetting meter's."""
        held = self.evaluate().metrics
        return held | forgetting.measure(self.model, self.general) if self.general else held


@dataclass
class HeldOut:
    metrics: dict[str, float]
    """perplexity and eval_loss over every held-out token."""
    document_losses: list[float]
    """Each held-out document's mean loss per token."""


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The base model with its method applied, the packed documents, and a Trainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    model, tokenizer = load_causal_lm(spec)
    train_docs, held_out = read_documents(spec)
    length = min(spec.max_seq_length, getattr(model.config, "max_position_embeddings", None) or spec.max_seq_length)
    pack_rows = partial(pack, length=length, pad_id=tokenizer.pad_token_id)
    train_rows = pack_rows(tokenize(train_docs, tokenizer))
    held_rows = pack_rows(tokenize(held_out, tokenizer))
    reporter.log(
        f"{len(train_docs)} training documents packed into {len(train_rows)} sequences of {length} "
        f"tokens; {len(held_out)} held-out documents ({held_rows.scored_tokens} tokens scored)."
    )
    if not held_out:
        reporter.log("No document is held out (one document, or validation fraction 0): no perplexity is measured.")
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    evaluate = partial(held_out_loss, model, held_rows, len(held_out), spec.batch_size)
    progress = ReportProgress(reporter, None, spec.eval_every)
    trainer = Trainer(
        model=model,
        args=training_arguments(spec),
        train_dataset=train_rows,
        data_collator=collate,
        callbacks=[progress, Checkpointing(spec, reporter, best_by=PRIMARY_METRIC)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout
    setup = Setup(spec, reporter, model, tokenizer, trainer, progress, held_out, evaluate)
    if held_out:
        progress.evaluate = setup.held_out_metrics
    return setup


def training_arguments(spec: TrainSpec) -> TrainingArguments:
    return training.arguments(
        spec,
        activation_checkpointing=spec.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with a frozen embedding (LoRA)
        remove_unused_columns=False,  # position_ids
        label_names=["labels"],
    )


def measure_baseline(setup: Setup) -> tuple[str | None, dict[str, Any]]:
    """(the checkpoint to resume from, or None; the untouched model on the held-out documents and
    the probe set): a resumed job keeps the one its first attempt measured."""
    resume_from, baseline = resume_or_measure(setup.spec, setup.reporter, partial(held_out_baseline, setup))
    general = baseline.get("general")
    setup.general = forgetting.Reference.from_json(general["reference"]) if general else None
    return resume_from, baseline


def held_out_baseline(setup: Setup) -> dict[str, Any]:
    if not setup.held_out:
        return {"metrics": {}, "document_losses": []}
    held = setup.evaluate()
    general, reference = forgetting.measure_base(setup.model, setup.tokenizer)
    # A full fine-tune changes the base, so it answers now; an adapter job's base answers after
    # training, its adapters switched off.
    answers = setup.general_answers() if setup.answers and not setup.spec.adapters else []
    if not setup.answers:
        setup.reporter.log("The base model has no chat template: the general prompts are not answered "
                           "(the forgetting meter measures the probe set all the same).")
    setup.reporter.eval(0, baseline=True, **held.metrics, **general)
    return {"metrics": held.metrics | general, "document_losses": held.document_losses,
            "general": {"reference": reference.to_json(), "answers": answers}}


def evaluate_after_training(setup: Setup, baseline: dict[str, Any], step: int) -> tuple[dict[str, float], list[dict]]:
    """The held-out metrics with the forgetting meter's, and the general answers before and after
    ({} and [] when nothing is held out); eval_predictions.json."""
    training.without_autocast(setup.trainer, setup.model)
    if not setup.held_out:
        write_predictions(setup.spec, [], [], [])
        return {}, []
    setup.reporter.state("evaluating")
    held = setup.evaluate()
    metrics = held.metrics | (forgetting.measure(setup.model, setup.general) if setup.general else {})
    general_answers = answers_before_and_after(setup, baseline)
    setup.reporter.eval(step, final=True, **metrics, general_answers=general_answers)
    write_predictions(setup.spec, setup.held_out, baseline["document_losses"], held.document_losses)
    return metrics, general_answers


def answers_before_and_after(setup: Setup, baseline: dict[str, Any]) -> list[dict]:
    if not setup.answers or "general" not in baseline:
        return []
    before = baseline["general"]["answers"]
    if setup.spec.adapters:
        with setup.model.disable_adapter():
            before = setup.general_answers()
    return forgetting.answers_table(before, setup.general_answers())


def save(setup: Setup, baseline: dict[str, Any], evaluated: tuple[dict[str, float], list[dict]], step: int) -> dict[str, Any]:
    """The artifact folder; the job's result."""
    spec, reporter = setup.spec, setup.reporter
    reporter.state("exporting")
    after, general_answers = evaluated
    metrics = {"train_loss": setup.progress.last_loss, "eval_loss": after.get("eval_loss"), "steps": step}
    summary = {"primary_metric": PRIMARY_METRIC, "metrics_before": baseline["metrics"], "metrics_after": after}
    card = metrics | summary
    checkpoints = Snapshots(spec).export(setup.model, step, after, card,
                                         lambda model, folder, values: export(model, setup.tokenizer, spec, values, folder))
    artifact_dir = export(setup.model, setup.tokenizer, spec, card, Path(spec.output_dir) / "final")
    reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "general_answers": general_answers, "artifact_dir": str(artifact_dir),
            "checkpoints": checkpoints}


def write_predictions(spec: TrainSpec, held_out: list[dict], before: list[float], after: list[float]) -> None:
    """Each held-out document's start and its perplexity before and after training."""
    predictions = [
        {"text": row["text"][:EXCERPT_CHARS], "perplexity_before": math.exp(b), "perplexity_after": math.exp(a),
         "loss_after": a}
        for row, b, a in zip(held_out, before, after, strict=True)
    ]
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(predictions, indent=2) + "\n")


# Evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, rows: Packed, documents: int, batch_size: int) -> HeldOut:
    """The mean loss per held-out token, over all of them and per document."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts = torch.zeros(documents, dtype=torch.float64), torch.zeros(documents, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        batch = slice(start, start + batch_size)
        inputs = collate([rows[index] for index in range(len(rows))[batch]])
        targets = inputs.pop("labels")[:, 1:]
        logits = model(**{name: _on(value, device) for name, value in inputs.items()}).logits
        scored = targets != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1][scored.to(device)].float(), targets[scored].to(device), reduction="none"
        )
        owners = rows.document[batch, 1:][scored]
        sums.index_add_(0, owners, losses.double().cpu())
        counts.index_add_(0, owners, torch.ones_like(owners, dtype=torch.float64))
    model.train(was_training)
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    per_document = (sums / counts.clamp(min=1)).tolist()
    return HeldOut({"perplexity": math.exp(loss), "eval_loss": loss}, per_document)


def _on(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


# Data -----------------------------------------------------------------------------------------


def read_documents(spec: TrainSpec) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out documents): the validation file's, or a seeded share."""
    documents = read_rows(Path(spec.dataset_path), FIELDS)
    if spec.validation_path:
        validation = read_rows(Path(spec.validation_path), FIELDS, "the validation file")
        return validation_split(documents, validation, spec.drop_validation_overlap)
    return split_rows(documents, spec.validation_fraction, spec.seed)


def tokenize(documents: list[dict], tokenizer) -> list[list[int]]:
    """Each document's token ids, ending with the end-of-text token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("The base model's tokenizer has no end-of-text token to separate documents with.")
    encoded = tokenizer([row["text"] for row in documents])["input_ids"] if documents else []
    return [ids if ids[-1:] == [eos] else [*ids, eos] for ids in encoded]


def pack(documents: list[list[int]], length: int, pad_id: int) -> Packed:
    """The documents laid end to end and cut into rows of `length` tokens (see the module docstring)."""
    sizes = torch.tensor([len(ids) for ids in documents], dtype=torch.long)
    total = int(sizes.sum())
    rows = max(1, -(-total // length))
    padding = rows * length - total
    # Each token's owner: its document, or len(documents) for the padding, which so starts a piece
    # of its own. A piece starts where its owner starts or where its row starts, whichever is later.
    owner = torch.repeat_interleave(torch.arange(len(documents) + 1), torch.cat([sizes, torch.tensor([padding])]))
    owner_start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
    index = torch.arange(rows * length)
    positions = index - torch.maximum(owner_start[owner], index // length * length)
    input_ids = torch.tensor([token for ids in documents for token in ids] + [pad_id] * padding, dtype=torch.long)
    padded = owner == len(documents)
    labels = input_ids.masked_fill((positions == 0) | padded, IGNORE_INDEX)
    document = owner.masked_fill(padded, -1)
    return Packed(*(values.view(rows, length) for values in (input_ids, positions, labels, document)))


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A batch of packed rows as the model takes it: without an attention mask and without a cache,
    either of which turns transformers' packed-sequence mask off (attention would cross documents)."""
    return default_data_collator(rows) | {"use_cache": False}
