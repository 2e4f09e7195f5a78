"""Preference tuning (DPO): teach a causal LM to prefer the chosen answer over the rejected one.

setup → train → save, on TRL's DPOTrainer.

- Data: JSONL rows {"prompt", "chosen", "rejected", optional "system"}, handed to TRL in its
  conversational format: the system and user turns are the prompt, each answer is one assistant
  turn, all rendered with the base model's chat template.
- The reference model is the base itself: for LoRA the same network with its adapters switched
  off (no copy), for a full fine-tune a frozen copy taken before training. Its log-probabilities
  are computed alongside each step (no precomputing pass: a short run sees each pair about once).
- Dropout is off while training (TRL's default), so that the policy's and the reference's
  log-probabilities of the same answer are comparable: the LoRA dropout setting has no effect.
- Held-out metrics are computed here for every held-out pair, in fp32, from the log-probability
  of each answer's tokens given the prompt (not from TRL's per-batch averages):
  - preference_accuracy (the primary metric): the share of pairs whose chosen answer gets a
    higher mean log-probability per token than the rejected one. It needs no reference model, so
    it means the same for the base at step 0 as after training. Mean per token, because a sum
    favours whichever answer is shorter.
  - reward_accuracy and reward_margin: DPO's implicit reward of an answer is
    beta · (log π(answer) − log π_ref(answer)), log-probabilities summed over its tokens. The share
    of pairs where chosen's reward is strictly higher, and the mean of chosen's minus rejected's.
    Both are 0 at step 0, where the model is the reference.
  - eval_loss: DPO's loss, −log σ(reward margin), averaged over pairs (log 2 at step 0).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length

from worker import training
from worker.artifacts import export
from worker.checkpointing import Checkpointing
from worker.checkpoints import resume_or_measure
from worker.conversations import prompt_messages as conversation_prompt
from worker.conversations import template_prompt
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import SAMPLE_COUNT, generate_replies
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.progress import METRIC_KEYS, ReportProgress
from worker.rows import read_rows, split_rows, validation_split
from worker.spec import TrainSpec

FIELDS = FAMILIES["dpo"].required
ANSWERS = ("chosen", "rejected")
FIELDS_NAMED = "prompt (or prompt_messages), chosen and rejected"
PAIRS_PER_FORWARD = 4  # held-out pairs scored per forward pass; bounds the memory of the full logits
PREFERENCE_KEYS = METRIC_KEYS | {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
"""DPO's reward accuracy and margin (TRL's, per batch) are reported with each step's loss."""


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = measure_baseline(setup)
    progress = report_progress(setup, baseline)
    step = training.train(setup.trainer, resume_from, reporter)
    after = evaluate_after_training(setup, baseline, step)
    return save(setup, baseline, after, progress.last_loss, step)


@dataclass
class Setup:
    """What one DPO run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: DPOTrainer
    eval_pairs: list[tuple[dict, dict]]
    """The held-out pairs as (row, token ids); empty when nothing is held out."""

    def scores(self) -> torch.Tensor:
        return score_pairs(self.model, self.eval_pairs, self.spec.max_seq_length)

    def replies(self) -> list[str]:
        """The model's replies to the first held-out prompts."""
        prompts = [template_prompt(row, self.tokenizer) for row, _ in self.eval_pairs[:SAMPLE_COUNT]]
        return generate_replies(self.model, self.tokenizer, [m for m, _ in prompts], [t for _, t in prompts])


@dataclass
class Baseline:
    """The untouched model on the held-out pairs. It is also the reference, so its scores are
    kept (with the baseline, for a resumed job: by then the model has moved)."""

    metrics: dict[str, float]
    replies: list[str]
    reference_scores: torch.Tensor


@dataclass
class Evaluation:
    """The held-out pairs after training (all empty when nothing is held out)."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The base model with its method applied, its reference, the pairs, and a DPOTrainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    datasets.disable_progress_bars()  # events go through the reporter, not stderr
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_pairs = prepare_data(spec, tokenizer, reporter)
    reference = copy.deepcopy(model).requires_grad_(False) if spec.method == "full" else None
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=dpo_arguments(spec),
        train_dataset=datasets.Dataset.from_list([conversation(row, tokenizer) for row in train_rows]),
        processing_class=tokenizer,
        callbacks=[Checkpointing(spec, reporter)],
    )
    if "ref" in getattr(model, "peft_config", {}):
        # TRL keeps a copy of a given adapter as the reference; ours is freshly initialised (it adds
        # nothing yet), so the base with adapters switched off is the same reference, for free.
        model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)
    return Setup(spec, reporter, model, tokenizer, trainer, eval_pairs)


def measure_baseline(setup: Setup) -> tuple[str | None, Baseline]:
    """(the checkpoint to resume from, or None; the untouched model's baseline): a resumed job
    keeps the one its first attempt measured."""
    resume_from, kept = resume_or_measure(setup.spec, setup.reporter, partial(held_out_baseline, setup))
    metrics, replies, reference_scores = kept
    return resume_from, Baseline(metrics, replies, torch.tensor(reference_scores).view(-1, 2, 2))


def held_out_baseline(setup: Setup) -> list:
    """[metrics, replies, reference scores], as JSON."""
    scores = setup.scores()
    metrics = preference_metrics(scores, scores, setup.spec.dpo_beta) if setup.eval_pairs else {}
    if setup.eval_pairs:
        setup.reporter.eval(0, baseline=True, **metrics)
    return [metrics, setup.replies(), scores.tolist()]


def report_progress(setup: Setup, baseline: Baseline) -> ReportProgress:
    """Each step's loss and rewards, and the held-out metrics every eval_every steps."""

    def evaluate() -> dict[str, float]:
        return preference_metrics(setup.scores(), baseline.reference_scores, setup.spec.dpo_beta)

    evaluate_held_out = evaluate if setup.eval_pairs else None
    progress = ReportProgress(setup.reporter, evaluate_held_out, setup.spec.eval_every, PREFERENCE_KEYS)
    setup.trainer.add_callback(progress)
    return progress


def evaluate_after_training(setup: Setup, baseline: Baseline, step: int) -> Evaluation:
    """The held-out metrics, a record per pair, and the sample replies before and after training."""
    if not setup.eval_pairs:
        return Evaluation()
    setup.reporter.state("evaluating")
    scores = setup.scores()
    metrics = preference_metrics(scores, baseline.reference_scores, setup.spec.dpo_beta)
    predictions = pair_predictions(setup.eval_pairs, scores, baseline.reference_scores, setup.spec.dpo_beta)
    sample_pairs = [row for row, _ in setup.eval_pairs[:SAMPLE_COUNT]]
    samples = [
        {"instruction": conversation_prompt(row)[-1]["content"], "reference": row["chosen"], "before": before,
         "after": after}
        for row, before, after in zip(sample_pairs, baseline.replies, setup.replies(), strict=True)
    ]
    setup.reporter.eval(step, final=True, **metrics, samples=samples)
    return Evaluation(metrics, samples, predictions)


def save(setup: Setup, baseline: Baseline, after: Evaluation, train_loss: float | None, step: int) -> dict[str, Any]:
    """The artifact folder and eval_predictions.json; the job's result."""
    spec = setup.spec
    setup.reporter.state("exporting")
    metrics = {"train_loss": train_loss, "eval_loss": after.metrics.get("eval_loss"), "steps": step}
    summary = {
        "primary_metric": FAMILIES["dpo"].primary_metric,
        "metrics_before": baseline.metrics,
        "metrics_after": after.metrics,
    }
    # The card's before → after table holds eval_loss; a top-level one would add a "perplexity",
    # which means nothing for a DPO loss.
    card_metrics = {"train_loss": train_loss, "steps": step, **summary}
    artifact_dir = export(setup.model, setup.tokenizer, spec, card_metrics, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(after.predictions, indent=2) + "\n")
    setup.reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "samples": after.samples, "artifact_dir": str(artifact_dir)}


def dpo_arguments(spec: TrainSpec) -> DPOConfig:
    return training.arguments(
        spec, DPOConfig, beta=spec.dpo_beta, **preference_loss(spec), max_length=spec.max_seq_length
    )


def preference_loss(spec: TrainSpec) -> dict:
    """Pure DPO, or DPO plus a likelihood term on the chosen reply (RPO) so the replies themselves move."""
    if spec.dpo_sft_weight == 0:
        return {"loss_type": ["sigmoid"]}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, spec.dpo_sft_weight]}


# Data -----------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, tokenizer, reporter: Reporter) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """The training rows, and the held-out pairs as (row, token ids) (seeded split of the file's rows)."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be preference-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    rows = read_rows(Path(spec.dataset_path), ANSWERS, keep=_with_prompt, fields_named=FIELDS_NAMED)
    if spec.validation_path:
        validation = validation_rows(Path(spec.validation_path))
        train, held_out = validation_split(rows, validation, spec.drop_validation_overlap, new_first=True)
    else:
        train, held_out = split_rows(rows, spec.validation_fraction, spec.seed)
    train_rows = [row for row, _ in tokenize_pairs(train, tokenizer, spec.max_seq_length, reporter, "training")]
    eval_pairs = tokenize_pairs(held_out, tokenizer, spec.max_seq_length, reporter, "validation")
    if not train_rows:
        raise UserError(
            f"No training prompt fits in max_seq_length={spec.max_seq_length} tokens with room for an "
            "answer. Raise the maximum length or shorten the prompts."
        )
    reporter.log(f"{len(train_rows)} training pairs, {len(eval_pairs)} validation pairs.")
    return train_rows, eval_pairs


def validation_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the uploaded validation file (its problems named as the validation file's)."""
    try:
        return read_rows(path, ANSWERS, keep=_with_prompt, fields_named=FIELDS_NAMED)
    except UserError as exc:
        raise UserError(f"In the validation file: {exc}") from exc


def _with_prompt(row: dict, where: str) -> dict:
    """A pair's prompt is text, or a conversation's turns (prompt_messages, worker.conversations)."""
    if not isinstance(row.get("prompt"), str) and not isinstance(row.get("prompt_messages"), list):
        raise UserError(f"{where} needs text fields {FIELDS_NAMED}.")
    return row


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int, reporter: Reporter, split: str) -> list[tuple]:
    """(row, token ids) for the rows whose prompt leaves room for an answer in max_length tokens."""
    pairs = [(row, tokenize_pair(row, tokenizer)) for row in rows]
    kept = [(row, ids) for row, ids in pairs if len(ids["prompt"]) < max_length]
    if len(kept) < len(rows):
        reporter.log(
            f"Skipped {len(rows) - len(kept)} of {len(rows)} {split} pairs: the prompt fills the "
            f"{max_length} tokens, leaving no room for an answer."
        )
    return kept


def tokenize_pair(row: dict[str, str], tokenizer) -> dict[str, list[int]]:
    """Token ids of the prompt and of each answer, split where TRL splits them (DPOTrainer._prepare_dataset)."""
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    messages, tools = template_prompt(row, tokenizer)
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True, tools=tools)
    prompt = render(messages, add_generation_prompt=True)
    chosen = render(messages + [{"role": "assistant", "content": row["chosen"]}])
    rejected = render(messages + [{"role": "assistant", "content": row["rejected"]}])
    length = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt": prompt[:length], "chosen": chosen[length:], "rejected": rejected[length:]}


def conversation(row: dict, tokenizer) -> dict[str, Any]:
    """A row in TRL's conversational preference format."""
    messages, tools = template_prompt(row, tokenizer)
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
        "chat_template_kwargs": {"sanitize_control_tokens": True, **({"tools": tools} if tools else {})},
    }


# Held-out scoring -----------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(model, pairs: list[tuple[dict, dict]], max_length: int) -> torch.Tensor:
    """For each pair, the summed log-probability and the token count of the chosen and of the
    rejected answer given the prompt: shape (pairs, 2 [chosen, rejected], 2 [log-prob, tokens]).

    Each prompt + answer is cut to max_length tokens, as in training. In fp32 throughout, so that
    the scores are exact and anyone can reproduce them: for bf16 training accelerate wraps the
    model's forward in autocast, and keeps the unwrapped one as `_original_forward`.
    """
    forward = getattr(model, "_original_forward", model.forward)
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(pairs), PAIRS_PER_FORWARD):
        sequences, answer_masks = [], []
        for _, ids in pairs[start : start + PAIRS_PER_FORWARD]:
            for answer in ("chosen", "rejected"):
                sequences.append((ids["prompt"] + ids[answer])[:max_length])
                answer_masks.append(([0] * len(ids["prompt"]) + [1] * len(ids[answer]))[:max_length])
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=model.device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        answer_mask = torch.tensor([m + [0] * (width - len(m)) for m in answer_masks], device=model.device)
        logits = forward(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # The token at position t is predicted from the logits at t - 1.
        token_logps = -F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        mask = answer_mask[:, 1:]
        sums, counts = (token_logps * mask).sum(dim=1), mask.sum(dim=1).float()
        scores.append(torch.stack([sums, counts], dim=1).view(-1, 2, 2).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0, 2, 2)


def preference_metrics(scores: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """The held-out metrics of the module docstring, from score_pairs of the model and of the reference."""
    mean_logps = scores[..., 0] / scores[..., 1].clamp(min=1)
    rewards = beta * (scores[..., 0] - reference[..., 0])
    margins = rewards[:, 0] - rewards[:, 1]
    return {
        "preference_accuracy": (mean_logps[:, 0] > mean_logps[:, 1]).float().mean().item(),
        "reward_accuracy": (margins > 0).float().mean().item(),
        "reward_margin": margins.mean().item(),
        "eval_loss": -F.logsigmoid(margins).mean().item(),
    }


def pair_predictions(pairs: list[tuple], scores: torch.Tensor, reference: torch.Tensor, beta: float) -> list[dict]:
    """One record per held-out pair: the texts, the scores, and which answer the model prefers."""
    records = []
    for (row, _), score, ref in zip(pairs, scores.tolist(), reference.tolist(), strict=True):
        (chosen_logp, chosen_tokens), (rejected_logp, rejected_tokens) = score
        records.append(
            {
                **{key: row[key] for key in ("system", "prompt_messages", "tools", *FIELDS) if key in row},
                "chosen_logp": chosen_logp,
                "rejected_logp": rejected_logp,
                "chosen_tokens": int(chosen_tokens),
                "rejected_tokens": int(rejected_tokens),
                "reference_chosen_logp": ref[0][0],
                "reference_rejected_logp": ref[1][0],
                "reward_chosen": beta * (chosen_logp - ref[0][0]),
                "reward_rejected": beta * (rejected_logp - ref[1][0]),
                "prefers_chosen": chosen_logp / max(chosen_tokens, 1) > rejected_logp / max(rejected_tokens, 1),
            }
        )
    return records
