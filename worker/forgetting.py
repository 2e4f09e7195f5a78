"""The forgetting meter for causal LMs: what fine-tuning cost the model on general text.

At step 0 the base model reads the probe set (worker/probes/: prose, dialogue and code that no
job trains on; the first PROBE_TOKENS tokens of each file, through the base's own tokenizer) and
we keep, for every probe position, its TOP_K most likely next tokens and TAIL_SAMPLES tokens drawn
from the rest of its distribution, with their log-probabilities: the Reference, about 0.6 MB
of JSON kept with the job's baseline, so that a resumed attempt compares with its first attempt's
base. No second copy of the model is needed. At every evaluation the model being trained reads
the same probe:

- general_perplexity: exp of its mean next-token loss on the probe;
- general_kl: the mean over probe positions of KL(p_base ‖ p_tuned) of the next-token
  distributions: exact over the base's top-k, and the rest estimated from the kept tail samples
  (kl_estimate says how; docs/performance.md gives its error against the full KL);
- forgetting: general_kl (0 = unchanged, higher = more forgotten). Every family's eval events and
  metrics carry `forgetting`, so the job page charts any of them the same way (the encoder
  families report 1 − Spearman ρ on general sentence pairs);
- general_kl_coverage: the base's probability mass inside its top-k, averaged over positions
  (how much of each distribution the KL sees token by token).

Besides the numbers, a person reads the base's and the tuned model's greedy answers to a few
general prompts (probes/prompts.json; general_answers in the job result).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.generation import generate_replies
from worker.hardware import bf16_supported

PROBE_DIR = Path(__file__).parent / "probes"
PROBE_FILES = ("prose.txt", "dialogue.txt", "code.txt")
PROMPTS_FILE = "prompts.json"
REPLAY_FILE = "replay.txt"
"""General text for replay (TrainChoices.replay_fraction): other text than the probe set's, so the
probe keeps measuring text the model never trained on."""
REPLAY_TOKENS = 128
"""Tokens per replay row (fewer when max_seq_length is shorter)."""
PROBE_TOKENS = 128
"""Tokens read from each probe file: 3 × 128 keeps the probe within 5 % of a default job's time
on a CPU (docs/performance.md, "The forgetting probe")."""
TOP_K = 64
"""The base's most likely next tokens kept per probe position (their share of the KL is exact)."""
TAIL_SAMPLES = 32
"""Tokens drawn per probe position from the base's distribution outside its top-k (seeded): the
Monte Carlo estimate of the rest of the KL."""
SAMPLING_SEED = 0
ANSWER_TOKENS = 32
"""Greedy tokens of each general answer."""
DECIMALS = 5
"""Of the kept log-probabilities (the KL of a model with itself through the JSON stays below 1e-5)."""


def probe_texts() -> dict[str, str]:
    """The probe set: file name → text."""
    return {name: (PROBE_DIR / name).read_text() for name in PROBE_FILES}


def general_prompts() -> list[str]:
    return json.loads((PROBE_DIR / PROMPTS_FILE).read_text())


def general_conversations() -> list[list[dict]]:
    """The general prompts as single-turn conversations for the chat template."""
    return [[{"role": "user", "content": prompt}] for prompt in general_prompts()]


def answers_table(before: list[str], after: list[str]) -> list[dict[str, str]]:
    """result["general_answers"]: each general prompt with the base's and the tuned model's answer
    ([] without the base's: a job resumed from a baseline kept before the meter existed)."""
    return [
        {"prompt": prompt, "before": b, "after": a}
        for prompt, b, a in zip(general_prompts(), before, after, strict=False)
    ]


def replay_rows(tokenizer, count: int, max_length: int) -> list[dict[str, list[int]]]:
    """`count` training rows of general text for replay: the replay file through the base's
    tokenizer, cut into rows of REPLAY_TOKENS tokens (or max_length), taken in turn and again from
    the start when more are wanted. The loss is on every token (labels = the token ids)."""
    ids = tokenizer((PROBE_DIR / REPLAY_FILE).read_text())["input_ids"]
    length = min(REPLAY_TOKENS, max_length)
    pieces = [ids[start : start + length] for start in range(0, len(ids) - 1, length)]
    pieces = [piece for piece in pieces if len(piece) > 1]
    return [{"input_ids": piece, "labels": list(piece)} for piece in (pieces[i % len(pieces)] for i in range(count))]


def replay_count(training_rows: int, fraction: float) -> int:
    """How many replay rows make `fraction` of the training rows once mixed in."""
    return round(training_rows * fraction / (1 - fraction)) if fraction else 0


# The probe -----------------------------------------------------------------------------------


@dataclass
class Probe:
    """The probe texts as token rows (right-padded to one width)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @classmethod
    def from_rows(cls, rows: list[list[int]]) -> Probe:
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
        return cls(ids, mask)

    @property
    def rows(self) -> list[list[int]]:
        return [ids[: int(mask.sum())].tolist() for ids, mask in zip(self.input_ids, self.attention_mask, strict=True)]

    @property
    def scored(self) -> torch.Tensor:
        """(rows, width - 1): the positions whose next token is a probe token."""
        return self.attention_mask[:, 1:].bool()

    @property
    def positions(self) -> int:
        return int(self.scored.sum())


def tokenize_probe(tokenizer, tokens: int = PROBE_TOKENS) -> Probe:
    """The first `tokens` tokens of each probe file, through the base's tokenizer."""
    rows = [tokenizer(text)["input_ids"][:tokens] for text in probe_texts().values()]
    return Probe.from_rows(rows)


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's next-token log-probabilities at each scored probe position, (P, vocab) fp32;
    the tokens that follow, (P,)). Under bf16 autocast where the machine has bf16, as training."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_supported()):
        logits = model(input_ids=probe.input_ids.to(device), attention_mask=probe.attention_mask.to(device)).logits
    model.train(was_training)
    scored = probe.scored.to(device)
    logprobs = logits[:, :-1][scored].float().log_softmax(-1)
    return logprobs, probe.input_ids[:, 1:].to(device)[scored]


# The base's reference and the comparison -------------------------------------------------------


@dataclass
class Reference:
    """What the base predicted on the probe: its top-k next tokens at every scored position."""

    probe: Probe
    top_ids: torch.Tensor
    """(P, TOP_K) token ids, most likely first."""
    top_logprobs: torch.Tensor
    """(P, TOP_K) their log-probabilities under the base."""
    tail_ids: torch.Tensor
    """(P, TAIL_SAMPLES) tokens drawn from the base's distribution outside its top-k."""
    tail_logprobs: torch.Tensor
    """(P, TAIL_SAMPLES) their log-probabilities under the base."""

    TENSORS = ("top_ids", "top_logprobs", "tail_ids", "tail_logprobs")

    def to_json(self) -> dict[str, Any]:
        def rounded(values: torch.Tensor) -> list:
            return [[round(value, DECIMALS) for value in row] for row in values.tolist()]

        tensors = {name: getattr(self, name) for name in self.TENSORS}
        return {"rows": self.probe.rows} | {
            name: rounded(values) if values.is_floating_point() else values.tolist() for name, values in tensors.items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        return cls(Probe.from_rows(data["rows"]), *(torch.tensor(data[name]) for name in cls.TENSORS))


def measure_base(model: torch.nn.Module, tokenizer) -> tuple[dict[str, float], Reference]:
    """The base model on the probe: its metrics (forgetting 0), and the reference later
    evaluations compare with."""
    probe = tokenize_probe(tokenizer)
    logprobs, targets = probe_logprobs(model, probe)
    top = logprobs.topk(min(TOP_K, logprobs.shape[-1]), dim=-1)
    tail_ids = sample_tail(logprobs, top.indices)
    reference = Reference(probe, top.indices.cpu(), top.values.cpu(), tail_ids.cpu(), logprobs.gather(-1, tail_ids).cpu())
    return general_metrics(logprobs, targets, reference), reference


def sample_tail(logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """(P, TAIL_SAMPLES) tokens drawn (seeded, with replacement) from each position's distribution
    with its top-k left out; (P, 0) when the top-k is the whole vocabulary."""
    if top_ids.shape[-1] >= logprobs.shape[-1]:
        return top_ids[:, :0]
    tail = logprobs.exp().scatter(-1, top_ids, 0).cpu()
    tail += 1e-30  # a position whose tail underflowed still draws (its p_rest, hence its weight, is 0)
    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    return torch.multinomial(tail, TAIL_SAMPLES, replacement=True, generator=generator).to(logprobs.device)


def measure(model: torch.nn.Module, reference: Reference) -> dict[str, float]:
    """The model being trained on the probe, against the base's reference."""
    logprobs, targets = probe_logprobs(model, reference.probe)
    return general_metrics(logprobs, targets, reference)


def general_metrics(logprobs: torch.Tensor, targets: torch.Tensor, reference: Reference) -> dict[str, float]:
    """What an evaluation reports from a model's probe log-probabilities."""
    def tuned(ids: torch.Tensor) -> torch.Tensor:
        return logprobs.gather(-1, ids.to(logprobs.device)).cpu()

    kl, coverage = kl_estimate(
        reference.top_logprobs, tuned(reference.top_ids), reference.tail_logprobs, tuned(reference.tail_ids))
    return {
        "general_perplexity": perplexity(logprobs, targets),
        "general_kl": float(kl.mean()),
        "forgetting": float(kl.mean()),
        "general_kl_coverage": float(coverage.mean()),
    }


class AgainstReferenceModel:
    """The forgetting meter of a recipe that holds its untouched base anyway: DPO keeps it as its
    reference (a full fine-tune's frozen copy, else the model with its adapters switched off).
    The base's probe reference and answers come from it when they are first needed, so nothing is
    kept with the baseline and a resumed job measures against the same base."""

    def __init__(self, model: Any, ref_model: Any, tokenizer: Any):
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.reference: Reference | None = None

    @contextmanager
    def base(self) -> Iterator[Any]:
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    def metrics(self) -> dict[str, float]:
        if self.reference is None:
            with self.base() as base:
                _, self.reference = measure_base(base, self.tokenizer)
        return measure(self.model, self.reference)

    def answers(self) -> list[dict[str, str]]:
        """The general prompts answered by the base and by the tuned model ([] without a chat template)."""
        if not self.tokenizer.chat_template:
            return []
        conversations = general_conversations()
        with self.base() as base:
            before = generate_replies(base, self.tokenizer, conversations, max_new_tokens=ANSWER_TOKENS)
        after = generate_replies(self.model, self.tokenizer, conversations, max_new_tokens=ANSWER_TOKENS)
        return answers_table(before, after)


# Pure helpers ----------------------------------------------------------------------------------


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean next-token loss."""
    loss = -logprobs.gather(-1, targets.unsqueeze(-1)).double().mean()
    return math.exp(float(loss))


def kl_estimate(
    base_top: torch.Tensor, tuned_at_top: torch.Tensor, base_tail: torch.Tensor, tuned_at_tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_base ‖ p_tuned) per position, the base's mass in its top-k): exact over the top-k,
    plus the rest estimated from tokens drawn from the base's tail.

    KL = Σ_top p·(log p − log q) + Σ_tail p·(log p − log q), and the second sum is
    p_rest · E_{v ~ p_tail}[log p_v − log q_v] (p_rest = 1 − Σ_top p; p_tail the base's
    distribution outside its top-k, renormalised): its Monte Carlo estimate over the kept samples
    is unbiased. Per position it can come out below 0 or off by a sampling error; the probe's mean
    over some hundred positions × TAIL_SAMPLES draws is what is reported (tests/test_forgetting.py
    measures it against the full KL on the tiny model). Without samples (the top-k is the whole
    vocabulary) the tail is empty and the sum exact.
    """
    p_log = base_top.double()
    p = p_log.exp()
    head = (p * (p_log - tuned_at_top.double())).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    if base_tail.shape[-1]:
        head = head + p_rest * (base_tail.double() - tuned_at_tail.double()).mean(-1)
    return head, p.sum(-1).clamp(max=1)


def full_kl(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_tuned) per position over the whole vocabulary, from (P, vocab) log-probabilities."""
    base, tuned = base.double(), tuned.double()
    return (base.exp() * (base - tuned)).sum(-1)
