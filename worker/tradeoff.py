"""Task gain against forgetting: which evaluations (or runs) are worth keeping, and which one
strikes the best balance.

A point is one evaluation of a job (or one run of a sweep): its value of the task's primary
metric and its forgetting (0 = the base model, higher = more forgotten; worker.forgetting and
worker.encoder_forgetting). A point is on the front when no other point is at least as good on
both and better on one: each point off the front is a worse deal than one on it. Of the front, the balanced point is
the one with the largest gain minus forgetting, each as a share of the largest seen among the
points (gain counted from the base's metric when it is known, else from the worst point's): past
it, each further share of task gain costs more than its share of forgetting.

Pure arithmetic, no torch: the web app marks the best run of a sweep with it, and the worker picks
the checkpoints it keeps for download (worker.snapshots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "forgetting", "general_kl", "general_perplexity"})


def better(metric: str, a: float, b: float) -> bool:
    """Whether `a` is a better value of `metric` than `b`."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def gain(metric: str, value: float, reference: float) -> float:
    """How much better `value` is than `reference` (positive = better), whichever way `metric` goes."""
    return reference - value if metric in LOWER_IS_BETTER else value - reference


@dataclass(frozen=True)
class Point:
    key: Any
    """What the point is of: a step, a job id."""
    metric: float
    forgetting: float


def points(entries: list[tuple[Any, dict[str, Any]]], metric: str) -> list[Point]:
    """(key, values) pairs → the points of those whose values hold both numbers."""
    found = []
    for key, values in entries:
        value, forgot = values.get(metric), values.get("forgetting")
        if _number(value) and _number(forgot):
            found.append(Point(key, float(value), float(forgot)))
    return found


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def dominates(metric: str, a: Point, b: Point) -> bool:
    """Whether `a` is at least as good as `b` on both counts and better on one."""
    as_good = not better(metric, b.metric, a.metric) and a.forgetting <= b.forgetting
    return as_good and (better(metric, a.metric, b.metric) or a.forgetting < b.forgetting)


def front(candidates: list[Point], metric: str) -> list[Point]:
    """The points no other point dominates, in their given order."""
    return [p for p in candidates if not any(dominates(metric, q, p) for q in candidates if q is not p)]


def balanced(candidates: list[Point], metric: str, base: float | None = None) -> Point | None:
    """The front's point with the largest gain minus forgetting, each as a share of the largest
    among `candidates` (the earlier point on a tie); None without points."""
    if not candidates:
        return None
    goodness = [gain(metric, p.metric, 0.0) for p in candidates]  # higher is better, whatever the metric
    start = gain(metric, base, 0.0) if _number(base) else min(goodness)
    gains = [g - start for g in goodness]
    top_gain = max(max(gains), 0.0)
    top_forgetting = max(p.forgetting for p in candidates)
    score = {
        id(p): (g / top_gain if top_gain > 0 else 0.0) - (p.forgetting / top_forgetting if top_forgetting > 0 else 0.0)
        for p, g in zip(candidates, gains, strict=True)
    }
    return max(front(candidates, metric), key=lambda p: (score[id(p)], -candidates.index(p)))
