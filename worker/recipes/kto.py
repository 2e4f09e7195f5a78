"""Preference tuning (KTO): teach a causal LM to write more like the completions labelled
desirable and less like those labelled undesirable, from unpaired rows.

setup → train → save, on TRL's KTOTrainer; the steps it shares with DPO are worker.preference's.

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
- The forgetting meter (worker.forgetting) rides along with every evaluation, as for DPO:
  general_kl (= forgetting) and general_perplexity on the probe set no job trains on, against the
  reference model (the untouched base), and the general prompts answered by the reference and by
  the tuned model in the final eval event and the result (general_answers). Nothing of it is kept
  with the baseline: a resumed job measures against the same reference.
"""

from __future__ import annotations

import random
from functools import cached_property, partial
from typing import Any

import datasets
import torch
from trl import KTOConfig, KTOTrainer
from trl.data_utils import common_prefix_length

from worker import forgetting, preference, training
from worker.conversations import template_prompt
from worker.desirability import ACCEPTED, is_desirable
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import SAMPLE_COUNT
from worker.progress import METRIC_KEYS
from worker.spec import TrainSpec

FIELDS = FAMILIES["kto"].required
KTO_KEYS = METRIC_KEYS | {"rewards/margins": "reward_margin", "kl": "kl"}
"""KTO's reward margin and KL estimate (TRL's, per batch) are reported with each step's loss."""


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = preference.set_up(Setup, spec, reporter, prepare_data, kto_trainer)
    resume_from, baseline = preference.measure_baseline(setup)
    progress = preference.report_progress(setup, baseline, KTO_KEYS)
    step = training.train(setup.trainer, resume_from, reporter)
    after = preference.evaluate_after_training(setup, baseline, step, answer_general=setup.general.answers)
    result = preference.save(setup, baseline, after, progress.last_loss, step)
    return result | {"general_answers": after.general_answers}


class Setup(preference.Setup):
    """What one KTO run trains and evaluates: its held-out rows are labelled completions."""

    @property
    def desirable(self) -> torch.Tensor:
        return torch.tensor([row["desirable"] for row, _ in self.eval_rows], dtype=torch.bool)

    def scores(self) -> torch.Tensor:
        """For each row, the summed log-probability and the token count of its own completion and of
        a mismatched one (the previous row's; the first row takes the last's, as TRL rotates a batch)
        given its prompt: shape (rows, 2 [own, mismatched], 2 [log-prob, tokens])."""
        own = [ids for _, ids in self.eval_rows]
        with_mismatched = [
            (ids["prompt"], (ids["completion"], other["completion"]))
            for ids, other in zip(own, own[-1:] + own[:-1], strict=True)
        ]
        return preference.score(self.model, with_mismatched, self.spec.max_seq_length)

    def metrics(self, scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return kto_metrics(scores, reference, self.desirable, self.spec.dpo_beta) | self.general.metrics()

    @cached_property
    def general(self) -> forgetting.AgainstReferenceModel:
        """The forgetting meter, against the reference model (the untouched base)."""
        return forgetting.AgainstReferenceModel(self.model, self.trainer.ref_model, self.tokenizer)

    def predictions(self, scores: torch.Tensor, reference: torch.Tensor) -> list[dict]:
        return row_predictions(self.eval_rows, scores, reference, self.spec.dpo_beta)

    def sample_rows(self) -> list[dict]:
        """Desirable rows first, since their completion is a reference answer."""
        rows = sorted((row for row, _ in self.eval_rows), key=lambda row: not row["desirable"])
        return rows[:SAMPLE_COUNT]

    def reference_answer(self, row: dict) -> str:
        return row["completion"] if row["desirable"] else ""


def kto_trainer(spec: TrainSpec, tokenizer, train_rows: list[dict], **shared: Any) -> KTOTrainer:
    """A KTOTrainer over the training rows (`shared`: the model, its reference and the callbacks)."""
    return KTOTrainer(
        args=kto_arguments(spec, train_rows),
        train_dataset=datasets.Dataset.from_list([conversation(row, tokenizer) for row in train_rows]),
        processing_class=tokenizer,
        **shared,
    )


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
    train_rows, eval_rows = preference.split_data(spec, tokenizer, reporter, LABELLED_ROWS)
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


def read_label(row: dict, where: str) -> dict:
    """The row with its label read as `desirable` (True or False)."""
    desirable = is_desirable(row["label"])
    if desirable is None:
        raise UserError(
            f"{where} has the label {row['label']!r}, which says neither desirable nor undesirable "
            f"(labels read: {ACCEPTED})."
        )
    return {**row, "desirable": desirable}


def tokenize_row(row: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of the prompt and of the completion, split where TRL splits them (KTOTrainer._prepare_dataset)."""
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    messages, tools = template_prompt(row, tokenizer)
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True, tools=tools)
    prompt = render(messages, add_generation_prompt=True)
    full = render(messages + [{"role": "assistant", "content": row["completion"]}])
    length = common_prefix_length(prompt, full)
    return {"prompt": prompt[:length], "completion": full[length:]}


LABELLED_ROWS = preference.Rows(
    fields=("completion", "label"),
    named="prompt (or prompt_messages), completion and label",
    noun="rows",
    answer="a completion",
    tokenize=tokenize_row,
    read=read_label,
)
"""How KTO's rows are read, tokenized and named."""


def conversation(row: dict, tokenizer) -> dict[str, Any]:
    """A row in TRL's conversational unpaired preference format."""
    messages, tools = template_prompt(row, tokenizer)
    return {
        "prompt": messages,
        "completion": [{"role": "assistant", "content": row["completion"]}],
        "label": row["desirable"],
        "chat_template_kwargs": {"sanitize_control_tokens": True, **({"tools": tools} if tools else {})},
    }


# Held-out metrics -----------------------------------------------------------------------------


def kto_metrics(
    scores: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float
) -> dict[str, float]:
    """The held-out metrics of the module docstring, from Setup.scores of the model and of the
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
