"""Preference tuning (DPO): teach a causal LM to prefer the chosen answer over the rejected one.

setup → train → save, on TRL's DPOTrainer; the steps it shares with KTO are worker.preference's.

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

from functools import cached_property, partial
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length

from worker import forgetting, preference, training
from worker.conversations import template_prompt
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import SAMPLE_COUNT
from worker.progress import METRIC_KEYS
from worker.spec import TrainSpec

FIELDS = FAMILIES["dpo"].required
PREFERENCE_KEYS = METRIC_KEYS | {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}
"""DPO's reward accuracy and margin (TRL's, per batch) are reported with each step's loss."""


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = preference.set_up(Setup, spec, reporter, prepare_data, dpo_trainer)
    resume_from, baseline = preference.measure_baseline(setup)
    progress = preference.report_progress(setup, baseline, PREFERENCE_KEYS)
    step = training.train(setup.trainer, resume_from, reporter)
    after = preference.evaluate_after_training(setup, baseline, step, answer_general=setup.general.answers)
    return preference.save(setup, baseline, after, progress.last_loss, step) | {"general_answers": after.general_answers}


class Setup(preference.Setup):
    """What one DPO run trains and evaluates: its held-out rows are pairs."""

    def scores(self) -> torch.Tensor:
        """For each pair, the summed log-probability and the token count of the chosen and of the
        rejected answer given the prompt: shape (pairs, 2 [chosen, rejected], 2 [log-prob, tokens])."""
        answers = [(ids["prompt"], (ids["chosen"], ids["rejected"])) for _, ids in self.eval_rows]
        return preference.score(self.model, answers, self.spec.max_seq_length)

    def metrics(self, scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return preference_metrics(scores, reference, self.spec.dpo_beta) | self.general.metrics()

    @cached_property
    def general(self) -> forgetting.AgainstReferenceModel:
        """The forgetting meter, against the reference model (the untouched base)."""
        return forgetting.AgainstReferenceModel(self.model, self.trainer.ref_model, self.tokenizer)

    def predictions(self, scores: torch.Tensor, reference: torch.Tensor) -> list[dict]:
        return pair_predictions(self.eval_rows, scores, reference, self.spec.dpo_beta)

    def sample_rows(self) -> list[dict]:
        """The first held-out pairs."""
        return [row for row, _ in self.eval_rows[:SAMPLE_COUNT]]

    def reference_answer(self, row: dict) -> str:
        return row["chosen"]


def dpo_trainer(spec: TrainSpec, tokenizer, train_rows: list[dict], **shared: Any) -> DPOTrainer:
    """A DPOTrainer over the training pairs (`shared`: the model, its reference and the callbacks)."""
    return DPOTrainer(
        args=dpo_arguments(spec),
        train_dataset=datasets.Dataset.from_list([conversation(row, tokenizer) for row in train_rows]),
        processing_class=tokenizer,
        **shared,
    )


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
    train_rows, eval_pairs = preference.split_data(spec, tokenizer, reporter, PAIRS)
    reporter.log(f"{len(train_rows)} training pairs, {len(eval_pairs)} validation pairs.")
    return train_rows, eval_pairs


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


PAIRS = preference.Rows(
    fields=("chosen", "rejected"),
    named="prompt (or prompt_messages), chosen and rejected",
    noun="pairs",
    answer="an answer",
    tokenize=tokenize_pair,
)
"""How DPO's rows are read, tokenized and named."""


def conversation(row: dict, tokenizer) -> dict[str, Any]:
    """A row in TRL's conversational preference format."""
    messages, tools = template_prompt(row, tokenizer)
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
        "chat_template_kwargs": {"sanitize_control_tokens": True, **({"tools": tools} if tools else {})},
    }


# Held-out metrics -----------------------------------------------------------------------------


def preference_metrics(scores: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """The held-out metrics of the module docstring, from Setup.scores of the model and of the reference."""
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
