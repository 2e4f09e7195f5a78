"""What the preference recipes share: DPO (worker/recipes/dpo.py, paired rows, TRL's DPOTrainer)
and KTO (worker/recipes/kto.py, unpaired labelled rows, TRL's KTOTrainer). Each recipe keeps its
own rows and their tokenization, its TRL trainer and config, its metrics, its per-row predictions
and its sample rows; this module holds the rest:

- Setup (a recipe subclasses it with its scoring, metrics, predictions and samples), Baseline and
  Evaluation: one run's state.
- set_up: the causal LM, its reference (the base itself: for LoRA the same network with its
  adapters switched off, no copy; for a full fine-tune a frozen copy taken before training), the
  method applied, the census, and the recipe's TRL trainer.
- measure_baseline, report_progress, evaluate_after_training, save: the steps of a recipe's run()
  after set_up. The untouched model is the reference, so its scores are kept with the baseline
  (for a resumed job: by then the model has moved).
- Rows and split_data: reading a recipe's rows (a chat template is needed; the prompt is text or a
  conversation's turns), the seeded split or the uploaded validation file, and rows whose prompt
  fills max_length skipped.
- score: the fp32 summed log-probability and token count of completions given their prompt.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
import torch.nn.functional as F
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback

from worker.artifacts import export
from worker.checkpointing import Checkpointing
from worker.checkpoints import resume_or_measure
from worker.conversations import prompt_messages, template_prompt
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

ROWS_PER_FORWARD = 4  # held-out rows scored per forward pass (two sequences each); bounds the logits' memory

Tokens = dict[str, list[int]]
"""A row's token ids by part: "prompt", then the recipe's answers ("chosen", "rejected" / "completion")."""


@dataclass
class Setup(ABC):
    """What one preference run trains and evaluates. A recipe's subclass says how its held-out
    rows are scored, measured, recorded and shown."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: Any
    eval_rows: list[tuple[dict, Tokens]]
    """The held-out rows as (row, token ids); empty when nothing is held out."""

    @abstractmethod
    def scores(self) -> torch.Tensor:
        """The model's scores of the held-out rows (score's shape: rows, 2, 2)."""

    @abstractmethod
    def metrics(self, scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        """The held-out metrics, from the model's scores and the reference's."""

    @abstractmethod
    def predictions(self, scores: torch.Tensor, reference: torch.Tensor) -> list[dict]:
        """One record per held-out row (eval_predictions.json)."""

    @abstractmethod
    def sample_rows(self) -> list[dict]:
        """The held-out rows whose prompts are answered before and after training."""

    @abstractmethod
    def reference_answer(self, row: dict) -> str:
        """The answer shown beside a sample row's replies."""

    def replies(self) -> list[str]:
        """The model's replies to the prompts of the sample rows."""
        prompts = [template_prompt(row, self.tokenizer) for row in self.sample_rows()]
        return generate_replies(self.model, self.tokenizer, [m for m, _ in prompts], [t for _, t in prompts])


@dataclass
class Baseline:
    """The untouched model on the held-out rows. It is also the reference, so its scores are kept
    (with the baseline, for a resumed job: by then the model has moved)."""

    metrics: dict[str, float]
    replies: list[str]
    reference_scores: torch.Tensor


@dataclass
class Evaluation:
    """The held-out rows after training (all empty when nothing is held out)."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    general_answers: list[dict] = field(default_factory=list)
    """The general prompts answered before and after (worker.forgetting), when the recipe asks."""


SetupKind = TypeVar("SetupKind", bound=Setup)
DataPreparer = Callable[[TrainSpec, Any, Reporter], tuple[list[dict], list[tuple[dict, Tokens]]]]


def set_up(
    kind: type[SetupKind], spec: TrainSpec, reporter: Reporter, prepare_data: DataPreparer, make_trainer: Callable
) -> SetupKind:
    """The base model with its method applied, its reference, the rows prepare_data(spec,
    tokenizer, reporter) returns (training rows, held-out rows), and the recipe's TRL trainer over
    them: make_trainer(spec, tokenizer, train_rows, model=, ref_model=, callbacks=)."""
    reporter.state("preparing")
    set_seed(spec.seed)
    datasets.disable_progress_bars()  # events go through the reporter, not stderr
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_rows = prepare_data(spec, tokenizer, reporter)
    reference = copy.deepcopy(model).requires_grad_(False) if spec.method == "full" else None
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    trainer = make_trainer(
        spec, tokenizer, train_rows, model=model, ref_model=reference, callbacks=[Checkpointing(spec, reporter)]
    )
    if "ref" in getattr(model, "peft_config", {}):
        # TRL keeps a copy of a given adapter as the reference; ours is freshly initialised (it adds
        # nothing yet), so the base with adapters switched off is the same reference, for free.
        model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)
    return kind(spec, reporter, model, tokenizer, trainer, eval_rows)


def measure_baseline(setup: Setup) -> tuple[str | None, Baseline]:
    """(the checkpoint to resume from, or None; the untouched model's baseline): a resumed job
    keeps the one its first attempt measured."""
    resume_from, kept = resume_or_measure(setup.spec, setup.reporter, partial(held_out_baseline, setup))
    metrics, replies, reference_scores = kept
    return resume_from, Baseline(metrics, replies, torch.tensor(reference_scores).view(-1, 2, 2))


def held_out_baseline(setup: Setup) -> list:
    """[metrics, replies, reference scores], as JSON."""
    scores = setup.scores()
    metrics = setup.metrics(scores, scores) if setup.eval_rows else {}
    if setup.eval_rows:
        setup.reporter.eval(0, baseline=True, **metrics)
    return [metrics, setup.replies(), scores.tolist()]


def report_progress(setup: Setup, baseline: Baseline, keys: dict[str, str]) -> ReportProgress:
    """Each step's loss and the rest of TRL's log `keys` (ReportProgress), and the held-out metrics
    every eval_every steps."""

    def evaluate() -> dict[str, float]:
        return setup.metrics(setup.scores(), baseline.reference_scores)

    evaluate_held_out = evaluate if setup.eval_rows else None
    progress = ReportProgress(setup.reporter, evaluate_held_out, setup.spec.eval_every, keys)
    setup.trainer.add_callback(progress)
    return progress


def evaluate_after_training(
    setup: Setup, baseline: Baseline, step: int, answer_general: Callable[[], list[dict]] | None = None
) -> Evaluation:
    """The held-out metrics, a record per row, and the sample replies before and after training;
    with answer_general, its general answers too (in the final eval event, as sft's)."""
    if not setup.eval_rows:
        return Evaluation()
    setup.reporter.state("evaluating")
    scores = setup.scores()
    metrics = setup.metrics(scores, baseline.reference_scores)
    predictions = setup.predictions(scores, baseline.reference_scores)
    samples = [
        {
            "instruction": prompt_messages(row)[-1]["content"],
            "reference": setup.reference_answer(row),
            "before": before,
            "after": after,
        }
        for row, before, after in zip(setup.sample_rows(), baseline.replies, setup.replies(), strict=True)
    ]
    general = {"general_answers": answer_general()} if answer_general else {}
    setup.reporter.eval(step, final=True, **metrics, samples=samples, **general)
    return Evaluation(metrics, samples, predictions, **general)


def save(setup: Setup, baseline: Baseline, after: Evaluation, train_loss: float | None, step: int) -> dict[str, Any]:
    """The artifact folder and eval_predictions.json; the job's result."""
    spec = setup.spec
    setup.reporter.state("exporting")
    metrics = {"train_loss": train_loss, "eval_loss": after.metrics.get("eval_loss"), "steps": step}
    summary = {
        "primary_metric": FAMILIES[spec.task].primary_metric,
        "metrics_before": baseline.metrics,
        "metrics_after": after.metrics,
    }
    # The card's before → after table holds eval_loss; a top-level one would add a "perplexity",
    # which means nothing for a preference loss.
    card_metrics = {"train_loss": train_loss, "steps": step, **summary}
    checkpoints = Snapshots(spec).export(setup.model, step, after.metrics, card_metrics,
                                         lambda model, folder, card: export(model, setup.tokenizer, spec, card, folder))
    artifact_dir = export(setup.model, setup.tokenizer, spec, card_metrics, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(after.predictions, indent=2) + "\n")
    setup.reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "samples": after.samples, "artifact_dir": str(artifact_dir), "checkpoints": checkpoints}


# Data -----------------------------------------------------------------------------------------


def _as_is(row: dict, where: str) -> dict:
    return row


@dataclass(frozen=True)
class Rows:
    """A recipe's rows: how they are read and tokenized, and how its messages name them."""

    fields: tuple[str, ...]
    """The text fields besides the prompt (which is text, or a conversation's turns as prompt_messages)."""
    named: str
    """The fields as a message names them: "prompt (or prompt_messages), chosen and rejected"."""
    noun: str
    """What the messages call the rows: "pairs"."""
    answer: str
    """What follows the prompt, as the messages call it: "an answer"."""
    tokenize: Callable[[dict, Any], Tokens]
    """tokenize(row, tokenizer): the row's token ids, split where TRL splits them."""
    read: Callable[[dict, str], dict] = _as_is
    """read(row, where): the row as the recipe keeps it, or a UserError starting with `where`."""


def split_data(
    spec: TrainSpec, tokenizer, reporter: Reporter, kind: Rows
) -> tuple[list[dict], list[tuple[dict, Tokens]]]:
    """The training rows, and the held-out rows as (row, token ids): the dataset's rows split
    (seeded), or all of them against the uploaded validation file's; rows whose prompt leaves no
    room for an answer are skipped."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be preference-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    rows = read_rows(Path(spec.dataset_path), kind.fields, keep=partial(_keep, kind), fields_named=kind.named)
    if spec.validation_path:
        validation = _validation_rows(Path(spec.validation_path), kind)
        train, held_out = validation_split(rows, validation, spec.drop_validation_overlap, new_first=True)
    else:
        train, held_out = split_rows(rows, spec.validation_fraction, spec.seed)
    train_rows = [row for row, _ in tokenize(kind, train, tokenizer, spec.max_seq_length, reporter, "training")]
    eval_rows = tokenize(kind, held_out, tokenizer, spec.max_seq_length, reporter, "validation")
    if not train_rows:
        raise UserError(
            f"No training prompt fits in max_seq_length={spec.max_seq_length} tokens with room for "
            f"{kind.answer}. Raise the maximum length or shorten the prompts."
        )
    return train_rows, eval_rows


def _keep(kind: Rows, row: dict, where: str) -> dict:
    """A row's prompt is text, or a conversation's turns (prompt_messages, worker.conversations)."""
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("prompt_messages"), list):
        raise UserError(f"{where} needs text fields {kind.named}.")
    return kind.read(row, where)


def _validation_rows(path: Path, kind: Rows) -> list[dict]:
    """The rows of the uploaded validation file (its problems named as the validation file's)."""
    try:
        return read_rows(path, kind.fields, keep=partial(_keep, kind), fields_named=kind.named)
    except UserError as exc:
        raise UserError(f"In the validation file: {exc}") from exc


def tokenize(
    kind: Rows, rows: list[dict], tokenizer, max_length: int, reporter: Reporter, split: str
) -> list[tuple[dict, Tokens]]:
    """(row, token ids) for the rows whose prompt leaves room for an answer in max_length tokens
    (TRL drops the others from training)."""
    tokenized = [(row, kind.tokenize(row, tokenizer)) for row in rows]
    kept = [(row, ids) for row, ids in tokenized if len(ids["prompt"]) < max_length]
    if len(kept) < len(rows):
        reporter.log(
            f"Skipped {len(rows) - len(kept)} of {len(rows)} {split} {kind.noun}: the prompt fills the "
            f"{max_length} tokens, leaving no room for {kind.answer}."
        )
    return kept


# Held-out scoring -----------------------------------------------------------------------------


@torch.no_grad()
def score(model, rows: list[tuple[list[int], tuple[list[int], list[int]]]], max_length: int) -> torch.Tensor:
    """For each (prompt ids, (completion ids, completion ids)), the summed log-probability and the
    token count of each completion given the prompt: shape (rows, 2, 2 [log-prob, tokens]).

    Each prompt + completion is cut to max_length tokens, as in training. In fp32 throughout, so
    that the scores are exact and anyone can reproduce them: for bf16 training accelerate wraps the
    model's forward in autocast, and keeps the unwrapped one as `_original_forward`.
    """
    forward = getattr(model, "_original_forward", model.forward)
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(rows), ROWS_PER_FORWARD):
        sequences, completion_masks = [], []
        for prompt, completions in rows[start : start + ROWS_PER_FORWARD]:
            for completion in completions:
                sequences.append((prompt + completion)[:max_length])
                completion_masks.append(([0] * len(prompt) + [1] * len(completion))[:max_length])
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=model.device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        completion_mask = torch.tensor([m + [0] * (width - len(m)) for m in completion_masks], device=model.device)
        logits = forward(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # The token at position t is predicted from the logits at t - 1.
        token_logps = -F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        mask = completion_mask[:, 1:]
        sums, counts = (token_logps * mask).sum(dim=1), mask.sum(dim=1).float()
        scores.append(torch.stack([sums, counts], dim=1).view(-1, 2, 2).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0, 2, 2)
