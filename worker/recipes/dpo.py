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
from collections.abc import Callable
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

from worker.artifacts import export
from worker.checkpoints import Checkpointing, keep_baseline, resume_point
from worker.errors import UserError
from worker.events import Reporter
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.recipes.sft import (
    SAMPLE_COUNT,
    ReportProgress,
    bf16_supported,
    generate_replies,
    read_rows,
    split_rows,
)
from worker.spec import TrainSpec

FIELDS = ("prompt", "chosen", "rejected")
PAIRS_PER_FORWARD = 4  # held-out pairs scored per forward pass; bounds the memory of the full logits


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    # Setup: base model, data, method, reference.
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
        train_dataset=datasets.Dataset.from_list([conversation(row) for row in train_rows]),
        processing_class=tokenizer,
        callbacks=[Checkpointing(spec, reporter)],
    )
    if "ref" in getattr(model, "peft_config", {}):
        # TRL keeps a copy of a given adapter as the reference; ours is freshly initialised (it adds
        # nothing yet), so the base with adapters switched off is the same reference, for free.
        model.delete_adapter("ref")
    trainer.remove_callback(PrinterCallback)

    # The untouched model on the held-out pairs. It is also the reference, so its scores are kept
    # (with the baseline, for a resumed job: by then the model has moved).
    sample_pairs = [row for row, _ in eval_pairs[:SAMPLE_COUNT]]
    resume_from, baseline = resume_point(spec, reporter)
    if resume_from is None:
        reference_scores = score_pairs(model, eval_pairs, spec.max_seq_length)
        metrics_before = preference_metrics(reference_scores, reference_scores, spec.dpo_beta) if eval_pairs else {}
        replies_before = generate_replies(model, tokenizer, [prompt_messages(row) for row in sample_pairs])
        keep_baseline(spec, [metrics_before, replies_before, reference_scores.tolist()])
        if eval_pairs:
            reporter.eval(0, baseline=True, **metrics_before)
    else:
        metrics_before, replies_before, reference = baseline
        reference_scores = torch.tensor(reference).view(-1, 2, 2)

    def evaluate() -> dict[str, float]:
        return preference_metrics(score_pairs(model, eval_pairs, spec.max_seq_length), reference_scores, spec.dpo_beta)

    progress = ReportPreferenceProgress(reporter, evaluate if eval_pairs else None, spec.eval_every)
    trainer.add_callback(progress)

    # Train, then evaluate once more on the held-out pairs.
    reporter.raise_if_stopped()
    trainer.train(resume_from_checkpoint=resume_from)
    reporter.raise_if_stopped()
    step = trainer.state.global_step
    metrics_after, samples, predictions = {}, [], []
    if eval_pairs:
        reporter.state("evaluating")
        scores = score_pairs(model, eval_pairs, spec.max_seq_length)
        metrics_after = preference_metrics(scores, reference_scores, spec.dpo_beta)
        predictions = pair_predictions(eval_pairs, scores, reference_scores, spec.dpo_beta)
        replies_after = generate_replies(model, tokenizer, [prompt_messages(row) for row in sample_pairs])
        samples = [
            {"instruction": row["prompt"], "reference": row["chosen"], "before": before, "after": after}
            for row, before, after in zip(sample_pairs, replies_before, replies_after, strict=True)
        ]
        reporter.eval(step, final=True, **metrics_after, samples=samples)

    # Save.
    reporter.state("exporting")
    metrics = {"train_loss": progress.last_loss, "eval_loss": metrics_after.get("eval_loss"), "steps": step}
    summary = {
        "primary_metric": "preference_accuracy",
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
    }
    # The card's before → after table holds eval_loss; a top-level one would add a "perplexity",
    # which means nothing for a DPO loss.
    card_metrics = {"train_loss": progress.last_loss, "steps": step, **summary}
    artifact_dir = export(model, tokenizer, spec, card_metrics, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(predictions, indent=2) + "\n")
    reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "samples": samples, "artifact_dir": str(artifact_dir)}


class ReportPreferenceProgress(ReportProgress):
    """SFT's progress reporting, plus DPO's reward accuracy and margin with each step's loss, and a
    held-out evaluation every `eval_every` steps (the last step is left to the recipe)."""

    metric_keys = ReportProgress.metric_keys | {
        "rewards/accuracies": "reward_accuracy",
        "rewards/margins": "reward_margin",
    }

    def __init__(self, reporter: Reporter, evaluate: Callable[[], dict[str, float]] | None, eval_every: int):
        super().__init__(reporter)
        self.evaluate = evaluate
        self.eval_every = eval_every

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.evaluate and state.global_step % self.eval_every == 0 and not control.should_training_stop:
            self.reporter.eval(state.global_step, **self.evaluate())


def dpo_arguments(spec: TrainSpec) -> DPOConfig:
    return DPOConfig(
        output_dir=spec.output_dir,
        beta=spec.dpo_beta,
        **preference_loss(spec),
        max_length=spec.max_seq_length,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a ratio of the total steps when below 1
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        logging_steps=1,
        eval_strategy="no",  # the recipe evaluates held-out pairs itself (see ReportPreferenceProgress)
        save_strategy="steps",  # resumable checkpoints; worker.checkpoints signs and prunes them
        save_steps=spec.checkpoint_every,
        report_to="none",
        activation_checkpointing=False,  # DPOConfig turns it on by default: slower, and not needed here
        dataloader_num_workers=0,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=bf16_supported(),  # DPOConfig defaults to bf16 even where it is slow
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
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
    rows = read_rows(Path(spec.dataset_path), FIELDS)
    if spec.validation_path:
        train, held_out = rows, validation_rows(Path(spec.validation_path))
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
        return read_rows(path, FIELDS)
    except UserError as exc:
        raise UserError(f"In the validation file: {exc}") from exc


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
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True)
    messages = prompt_messages(row)
    prompt = render(messages, add_generation_prompt=True)
    chosen = render(messages + [{"role": "assistant", "content": row["chosen"]}])
    rejected = render(messages + [{"role": "assistant", "content": row["rejected"]}])
    length = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt": prompt[:length], "chosen": chosen[length:], "rejected": rejected[length:]}


def prompt_messages(row: dict[str, str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": row["prompt"]}]


def conversation(row: dict[str, str]) -> dict[str, Any]:
    """A row in TRL's conversational preference format."""
    return {
        "prompt": prompt_messages(row),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
        "chat_template_kwargs": {"sanitize_control_tokens": True},
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
                **{key: row[key] for key in ("system", *FIELDS) if key in row},
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
