"""Preference tuning (KTO): teach a causal LM to write more like the completions labelled
desirable and less like those labelled undesirable, from unpaired rows.

setup → train → save, on TRL's KTOTrainer.

- Data: JSONL rows {"prompt", "completion", "label", optional "system"} (or a multi-turn prompt
  as "prompt_messages", with optional "tools": worker.conversations), the label read by
  worker.desirability (as the data checks read it). They are handed to TRL in its conversational
  unpaired format: the system and user turns are the prompt, the completion one assistant turn,
  rendered with the base model's chat template. When one kind of label is rarer, its rows weigh
  more in the loss, so that both kinds weigh the same (within the range the KTO paper's eq. 8 and
  TRL recommend).
- KTO measures how far the model has moved from the reference by a KL estimate taken from
  mismatched pairs: each row's prompt with its batch neighbour's completion. So a batch holds two
  rows at least (worker.spec refuses fewer), and TRL reads the rows in order (no shuffling
  sampler); the training rows are shuffled here once, seeded, so that a file sorted by label still
  mixes both kinds in every batch.
- The reference model is the base itself, as for DPO: for LoRA the same network with its
  adapters switched off (no copy), for a full fine-tune a frozen copy taken before training.
  Dropout is off while training (TRL's default): the LoRA dropout setting has no effect.
- Held-out metrics are computed here for every held-out row, in fp32, from the log-probability
  of its completion's tokens given its prompt, summed (not from TRL's per-batch averages). A
  completion's implicit reward is r = beta · (log π(completion) − log π_ref(completion)):
  - sign_accuracy (the primary metric): the share of rows whose reward has the sign of its label
    (desirable: r > 0, undesirable: r < 0). A reward of exactly 0 counts as half right: at step 0
    the model is its own reference and every reward is 0, so the untouched model scores 0.5,
    what a coin toss would, and any rise above it is learnt.
  - reward_margin: the mean reward of the desirable rows minus that of the undesirable ones (a
    kind missing from the held-out rows counts as a mean of 0). 0 at step 0.
  - eval_loss: KTO's loss, every row weighing the same: 1 − σ(beta · (log-ratio − KL)) for a
    desirable row, 1 − σ(beta · (KL − log-ratio)) for an undesirable one, with KL estimated as TRL
    does (the mean log-ratio of mismatched pairs, here each held-out prompt with the previous
    held-out row's completion; at least 0). 0.5 at step 0.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback
from trl import KTOConfig, KTOTrainer
from trl.data_utils import common_prefix_length

from worker import training
from worker.artifacts import export
from worker.checkpointing import Checkpointing
from worker.checkpoints import resume_or_measure
from worker.conversations import prompt_messages as conversation_prompt
from worker.conversations import template_prompt
from worker.desirability import ACCEPTED, is_desirable
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import SAMPLE_COUNT, generate_replies
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.progress import METRIC_KEYS, ReportProgress
from worker.rows import read_rows, split_rows, validation_split
from worker.spec import TrainSpec

FIELDS = FAMILIES["kto"].required
ANSWER_FIELDS = ("completion", "label")
FIELDS_NAMED = "prompt (or prompt_messages), completion and label"
ROWS_PER_FORWARD = 4  # held-out rows scored per forward pass (two sequences each); bounds the logits' memory
KTO_KEYS = METRIC_KEYS | {"rewards/margins": "reward_margin", "kl": "kl"}
"""KTO's reward margin and KL estimate (TRL's, per batch) are reported with each step's loss."""


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = measure_baseline(setup)
    progress = report_progress(setup, baseline)
    step = training.train(setup.trainer, resume_from, reporter)
    after = evaluate_after_training(setup, baseline, step)
    return save(setup, baseline, after, progress.last_loss, step)


@dataclass
class Setup:
    """What one KTO run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: KTOTrainer
    eval_rows: list[tuple[dict, dict]]
    """The held-out rows as (row, token ids); empty when nothing is held out."""

    @property
    def desirable(self) -> torch.Tensor:
        return torch.tensor([row["desirable"] for row, _ in self.eval_rows], dtype=torch.bool)

    def scores(self) -> torch.Tensor:
        return score_rows(self.model, self.eval_rows, self.spec.max_seq_length)

    def metrics(self, scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return kto_metrics(scores, reference, self.desirable, self.spec.dpo_beta)

    def replies(self) -> list[str]:
        """The model's replies to the prompts of the sample rows."""
        prompts = [template_prompt(row, self.tokenizer) for row in sample_rows(self.eval_rows)]
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


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The base model with its method applied, its reference, the rows, and a KTOTrainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    datasets.disable_progress_bars()  # events go through the reporter, not stderr
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_rows = prepare_data(spec, tokenizer, reporter)
    reference = copy.deepcopy(model).requires_grad_(False) if spec.method == "full" else None
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    trainer = KTOTrainer(
        model=model,
        ref_model=reference,
        args=kto_arguments(spec, train_rows),
        train_dataset=datasets.Dataset.from_list([conversation(row, tokenizer) for row in train_rows]),
        processing_class=tokenizer,
        callbacks=[Checkpointing(spec, reporter)],
    )
    if "ref" in getattr(model, "peft_config", {}):
        # TRL keeps a copy of a given adapter as the reference; ours is freshly initialised (it adds
        # nothing yet), so the base with adapters switched off is the same reference, for free.
        model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)
    return Setup(spec, reporter, model, tokenizer, trainer, eval_rows)


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


def report_progress(setup: Setup, baseline: Baseline) -> ReportProgress:
    """Each step's loss, reward margin and KL estimate, and the held-out metrics every eval_every steps."""

    def evaluate() -> dict[str, float]:
        return setup.metrics(setup.scores(), baseline.reference_scores)

    evaluate_held_out = evaluate if setup.eval_rows else None
    progress = ReportProgress(setup.reporter, evaluate_held_out, setup.spec.eval_every, KTO_KEYS)
    setup.trainer.add_callback(progress)
    return progress


def evaluate_after_training(setup: Setup, baseline: Baseline, step: int) -> Evaluation:
    """The held-out metrics, a record per row, and the sample replies before and after training."""
    if not setup.eval_rows:
        return Evaluation()
    setup.reporter.state("evaluating")
    scores = setup.scores()
    metrics = setup.metrics(scores, baseline.reference_scores)
    predictions = row_predictions(setup.eval_rows, scores, baseline.reference_scores, setup.spec.dpo_beta)
    samples = [
        {
            "instruction": conversation_prompt(row)[-1]["content"],
            "reference": row["completion"] if row["desirable"] else "",
            "before": before,
            "after": after,
        }
        for row, before, after in zip(sample_rows(setup.eval_rows), baseline.replies, setup.replies(), strict=True)
    ]
    setup.reporter.eval(step, final=True, **metrics, samples=samples)
    return Evaluation(metrics, samples, predictions)


def save(setup: Setup, baseline: Baseline, after: Evaluation, train_loss: float | None, step: int) -> dict[str, Any]:
    """The artifact folder and eval_predictions.json; the job's result."""
    spec = setup.spec
    setup.reporter.state("exporting")
    metrics = {"train_loss": train_loss, "eval_loss": after.metrics.get("eval_loss"), "steps": step}
    summary = {
        "primary_metric": FAMILIES["kto"].primary_metric,
        "metrics_before": baseline.metrics,
        "metrics_after": after.metrics,
    }
    # The card's before → after table holds eval_loss; a top-level one would add a "perplexity",
    # which means nothing for KTO's loss.
    card_metrics = {"train_loss": train_loss, "steps": step, **summary}
    artifact_dir = export(setup.model, setup.tokenizer, spec, card_metrics, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(after.predictions, indent=2) + "\n")
    setup.reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "samples": after.samples, "artifact_dir": str(artifact_dir)}


def kto_arguments(spec: TrainSpec, train_rows: list[dict]) -> KTOConfig:
    return training.arguments(
        spec,
        KTOConfig,
        beta=spec.dpo_beta,
        max_length=spec.max_seq_length,
        activation_checkpointing=spec.gradient_checkpointing,
        **balancing_weights(train_rows),
    )


def balancing_weights(train_rows: list[dict]) -> dict[str, float]:
    """Loss weights under which the desirable and the undesirable rows weigh the same in all."""
    desirable = sum(row["desirable"] for row in train_rows)
    undesirable = len(train_rows) - desirable
    return {
        "desirable_weight": max(1.0, undesirable / desirable),
        "undesirable_weight": max(1.0, desirable / undesirable),
    }


# Data -----------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, tokenizer, reporter: Reporter) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """The training rows (shuffled, seeded), and the held-out rows as (row, token ids) (seeded split)."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be preference-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    rows = read_rows(Path(spec.dataset_path), ANSWER_FIELDS, keep=read_row, fields_named=FIELDS_NAMED)
    if spec.validation_path:
        validation = validation_rows(Path(spec.validation_path))
        train, held_out = validation_split(rows, validation, spec.drop_validation_overlap, new_first=True)
    else:
        train, held_out = split_rows(rows, spec.validation_fraction, spec.seed)
    train_rows = [row for row, _ in tokenize_rows(train, tokenizer, spec.max_seq_length, reporter, "training")]
    eval_rows = tokenize_rows(held_out, tokenizer, spec.max_seq_length, reporter, "validation")
    if not train_rows:
        raise UserError(
            f"No training prompt fits in max_seq_length={spec.max_seq_length} tokens with room for a "
            "completion. Raise the maximum length or shorten the prompts."
        )
    desirable = sum(row["desirable"] for row in train_rows)
    if desirable in (0, len(train_rows)):
        kind = "desirable" if desirable else "undesirable"
        raise UserError(
            f"Every training row is labelled {kind}. KTO learns from both kinds: add rows of the other kind, "
            "or train on the desirable completions with instruction tuning."
        )
    random.Random(spec.seed).shuffle(train_rows)
    reporter.log(
        f"{len(train_rows)} training rows ({desirable} desirable, {len(train_rows) - desirable} undesirable), "
        f"{len(eval_rows)} validation rows."
    )
    return train_rows, eval_rows


def read_row(row: dict, where: str) -> dict:
    """The row with its label read as `desirable` (True or False); its prompt is text, or a
    conversation's turns (prompt_messages, worker.conversations)."""
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("prompt_messages"), list):
        raise UserError(f"{where} needs text fields {FIELDS_NAMED}.")
    desirable = is_desirable(row["label"])
    if desirable is None:
        raise UserError(
            f"{where} has the label {row['label']!r}, which says neither desirable nor undesirable "
            f"(labels read: {ACCEPTED})."
        )
    return {**row, "desirable": desirable}


def validation_rows(path: Path) -> list[dict]:
    """The rows of the uploaded validation file (its problems named as the validation file's)."""
    try:
        return read_rows(path, ANSWER_FIELDS, keep=read_row, fields_named=FIELDS_NAMED)
    except UserError as exc:
        raise UserError(f"In the validation file: {exc}") from exc


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, reporter: Reporter, split: str) -> list[tuple]:
    """(row, token ids) for the rows whose prompt leaves room for a completion in max_length tokens
    (TRL drops the others from training)."""
    tokenized = [(row, tokenize_row(row, tokenizer)) for row in rows]
    kept = [(row, ids) for row, ids in tokenized if len(ids["prompt"]) < max_length]
    if len(kept) < len(rows):
        reporter.log(
            f"Skipped {len(rows) - len(kept)} of {len(rows)} {split} rows: the prompt fills the "
            f"{max_length} tokens, leaving no room for a completion."
        )
    return kept


def tokenize_row(row: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of the prompt and of the completion, split where TRL splits them (KTOTrainer._prepare_dataset)."""
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    messages, tools = template_prompt(row, tokenizer)
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True, tools=tools)
    prompt = render(messages, add_generation_prompt=True)
    full = render(messages + [{"role": "assistant", "content": row["completion"]}])
    length = common_prefix_length(prompt, full)
    return {"prompt": prompt[:length], "completion": full[length:]}


def conversation(row: dict, tokenizer) -> dict[str, Any]:
    """A row in TRL's conversational unpaired preference format."""
    messages, tools = template_prompt(row, tokenizer)
    return {
        "prompt": messages,
        "completion": [{"role": "assistant", "content": row["completion"]}],
        "label": row["desirable"],
        "chat_template_kwargs": {"sanitize_control_tokens": True, **({"tools": tools} if tools else {})},
    }


def sample_rows(eval_rows: list[tuple[dict, dict]]) -> list[dict]:
    """The held-out rows whose prompts are answered before and after training: desirable rows
    first, since their completion is a reference answer."""
    rows = sorted((row for row, _ in eval_rows), key=lambda row: not row["desirable"])
    return rows[:SAMPLE_COUNT]


# Held-out scoring -----------------------------------------------------------------------------


@torch.no_grad()
def score_rows(model, rows: list[tuple[dict, dict]], max_length: int) -> torch.Tensor:
    """For each row, the summed log-probability and the token count of its own completion and of a
    mismatched one (the previous row's; the first row takes the last's, as TRL rotates a batch)
    given its prompt: shape (rows, 2 [own, mismatched], 2 [log-prob, tokens]).

    Each prompt + completion is cut to max_length tokens, as in training. In fp32 throughout, so
    that the scores are exact and anyone can reproduce them: for bf16 training accelerate wraps the
    model's forward in autocast, and keeps the unwrapped one as `_original_forward`.
    """
    forward = getattr(model, "_original_forward", model.forward)
    was_training = model.training
    model.eval()
    own = [ids for _, ids in rows]
    with_mismatched = list(zip(own, own[-1:] + own[:-1], strict=True))
    scores = []
    for start in range(0, len(rows), ROWS_PER_FORWARD):
        sequences, completion_masks = [], []
        for ids, other in with_mismatched[start : start + ROWS_PER_FORWARD]:
            for completion in (ids["completion"], other["completion"]):
                sequences.append((ids["prompt"] + completion)[:max_length])
                completion_masks.append(([0] * len(ids["prompt"]) + [1] * len(completion))[:max_length])
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


def kto_metrics(
    scores: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float
) -> dict[str, float]:
    """The held-out metrics of the module docstring, from score_rows of the model and of the
    reference, and each row's label (True: desirable)."""
    logratios = scores[..., 0] - reference[..., 0]
    rewards = beta * logratios[:, 0]
    right = torch.where(rewards == 0, 0.5, ((rewards > 0) == desirable).float())
    kl = logratios[:, 1].mean().clamp(min=0)
    losses = torch.where(
        desirable, 1 - torch.sigmoid(beta * (logratios[:, 0] - kl)), 1 - torch.sigmoid(beta * (kl - logratios[:, 0]))
    )
    return {
        "sign_accuracy": right.mean().item(),
        "reward_margin": _mean(rewards[desirable]) - _mean(rewards[~desirable]),
        "eval_loss": losses.mean().item(),
    }


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if len(values) else 0.0


def row_predictions(rows: list[tuple], scores: torch.Tensor, reference: torch.Tensor, beta: float) -> list[dict]:
    """One record per held-out row: the texts, the scores, the reward and whether its sign is the label's."""
    records = []
    for (row, _), score, ref in zip(rows, scores.tolist(), reference.tolist(), strict=True):
        (logp, tokens), _ = score
        reward = beta * (logp - ref[0][0])
        records.append(
            {
                **{key: row[key] for key in ("system", "prompt_messages", "tools", *FIELDS) if key in row},
                "desirable": row["desirable"],
                "logp": logp,
                "tokens": int(tokens),
                "reference_logp": ref[0][0],
                "reward": reward,
                "sign_right": reward > 0 if row["desirable"] else reward < 0,
            }
        )
    return records
