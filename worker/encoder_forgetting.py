"""The forgetting meter of the encoder families (classify, pair, rerank, embed): how far fine-tuning
moved the encoder's picture of general text.

The probe (worker/probes/encoder/pairs.jsonl) is a set of everyday sentence pairs, from
paraphrases to unrelated, each with a gold relatedness score (0-5, as in STS). A model's picture
of the probe is one cosine similarity per pair, between the attention-masked means of the
encoder's last hidden state for the two sentences (for a classifier or a cross-encoder the
network under the head; for all-MiniLM-L6-v2 exactly its own sentence embedding).

- general_rho: the Spearman rank correlation between the base's similarities and the tuned
  model's (1: the same order of relatedness).
- forgetting = 1 - general_rho: 0 unchanged, higher more forgotten (up to 2). The causal-LM
  families report their own `forgetting` (a KL) under the same key, so the job page charts every
  family alike.
- general_gold_rho (embedding jobs): the Spearman correlation of the model's similarities with
  the gold scores: whether general semantic similarity got better or worse.

The base's similarities are measured once, at step 0, and kept with the baseline
(worker.checkpoints.keep_baseline), so a resumed job compares with its first attempt's base: after
a full fine-tune the base is gone, and keeping the numbers is cheaper than running a LoRA
model's base again (disable_adapter) at every evaluation.

Cost: the baseline and the final evaluation always measure; an evaluation during training
measures only while the meter's time stays within BUDGET of the time since it was set up. On a
GPU that is every evaluation; on one CPU core a pass costs all-MiniLM-L6-v2 about 0.7 s, some three
steps of the suggested classification job, so a short job gets the two ends and a long one a point
now and then (the suggested jobs spend 4-8 % of their time on the probe, most of it at the ends).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROBE = Path(__file__).parent / "probes" / "encoder" / "pairs.jsonl"
BATCH_SIZE = 32
MAX_TOKENS = 64  # the probe's sentences are short: nothing is cut
BUDGET = 0.05
"""The share of a job's time the evaluations during training may spend on the probe."""


def load_probe(path: Path = PROBE) -> list[dict]:
    """The probe's pairs: {"a": sentence, "b": sentence, "gold": relatedness 0-5}."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ForgettingMeter:
    """Measures a network's pair similarities on the probe against the base's.

    `network` returns the transformers model to measure (a getter: a trainer may swap the module
    it holds); it must accept output_hidden_states. `tokenizer` is the model's own. `gold`: also
    report general_gold_rho (embedding models).
    """

    def __init__(self, network: Callable[[], torch.nn.Module], tokenizer, gold: bool = False):
        pairs = load_probe()
        sentences = list(dict.fromkeys(text for pair in pairs for text in (pair["a"], pair["b"])))
        lengths = dict(zip(sentences, map(len, tokenizer(sentences)["input_ids"]), strict=True))
        sentences.sort(key=lengths.get)  # so each batch pads little
        index = {text: position for position, text in enumerate(sentences)}
        self.network = network
        self.first = torch.tensor([index[pair["a"]] for pair in pairs])
        self.second = torch.tensor([index[pair["b"]] for pair in pairs])
        self.gold = [float(pair["gold"]) for pair in pairs] if gold else None
        self.batches = [
            tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            for batch in (sentences[start : start + BATCH_SIZE] for start in range(0, len(sentences), BATCH_SIZE))
        ]
        self.base: list[float] | None = None
        """The base's similarities: the first measurement's (the baseline's), or those a resumed
        job's first attempt kept with its baseline."""
        self.off = False
        self.started = time.monotonic()
        self.spent = 0.0
        self.last_cost = 0.0

    def keep_base(self, base: list[float] | None) -> None:
        """Compare with `base`, the similarities kept with the baseline. None: the baseline was
        kept before the meter existed (a job resumed across the upgrade) and the base is gone, so
        the meter stays off rather than taking the resumed model for the base."""
        self.base = base
        self.off = base is None

    def __call__(self) -> dict[str, float]:
        """An evaluation's values: forgetting against the base (and general_gold_rho); the first
        call, at step 0, measures the base itself. Nothing once the meter is off (keep_base)."""
        if self.off:
            return {}
        similarities = self.similarities()
        if self.base is None:
            self.base = similarities
        values = {"forgetting": forgetting(self.base, similarities)}
        if self.gold is not None:
            values["general_gold_rho"] = round(spearman(similarities, self.gold), 6)
        return values

    def if_affordable(self) -> dict[str, float]:
        """An evaluation during training: the meter's values when one more pass stays within
        BUDGET, else nothing."""
        if self.spent + self.last_cost > BUDGET * (time.monotonic() - self.started):
            return {}
        return self()

    def similarities(self) -> list[float]:
        """The cosine similarity of each probe pair's mean-pooled last hidden states (eval mode)."""
        start = time.monotonic()
        similarities = self._similarities()
        self.last_cost = time.monotonic() - start
        self.spent += self.last_cost
        return similarities

    @torch.no_grad()
    def _similarities(self) -> list[float]:
        network = self.network()
        was_training = network.training
        network.eval()
        device = next(network.parameters()).device
        pooled = []
        for batch in self.batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            hidden = network(**batch, output_hidden_states=True).hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
        network.train(was_training)
        vectors = torch.cat(pooled)
        return torch.cosine_similarity(vectors[self.first], vectors[self.second], dim=-1).tolist()


def forgetting(base: list[float], tuned: list[float]) -> float:
    """1 - Spearman(base, tuned), rounded to 6 places (a model against itself: exactly 0)."""
    return round(max(0.0, 1.0 - spearman(base, tuned)), 6)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); 0 when either side is constant."""
    rx, ry = ranks(torch.tensor(x, dtype=torch.float64)), ranks(torch.tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / norm) if norm > 0 else 0.0


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values`, each group of equal values sharing the mean of its ranks."""
    distinct, group = torch.unique(values, return_inverse=True)  # distinct values come sorted
    counts = torch.bincount(group, minlength=len(distinct)).to(torch.float64)
    last = counts.cumsum(0)  # the rank of each group's last member
    return (last - (counts - 1) / 2)[group]
