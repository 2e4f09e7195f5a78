"""The census of frozen and trained parameters, shown on the job page before training starts.

For LoRA each adapted weight matrix W (d x k) stays frozen and learns B·A instead, with
B (d x r) and A (r x k): r·(d + k) numbers in place of d·k. The census lists, per module type
and shape, how many such matrices there are and what that saves. Matrices trained in full (every
weight of a full fine-tune, the task head of a head-only run, a classifier head trained beside
LoRA adapters) are listed with lora = None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from worker.spec import TrainSpec


def census(model: nn.Module, spec: TrainSpec) -> dict[str, Any]:
    """Counts of total, trainable and frozen parameters plus one row per matrix kind (JSON-ready).

    Shared tensors (tied input and output embeddings) are counted once.
    """
    parameters = list(model.parameters())  # nn.Module.parameters() yields a shared tensor once
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return {
        "method": spec.method,
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "trainable_pct": round(100 * trainable / total, 4) if total else 0.0,
        "matrices": (_lora_rows(model) if spec.adapters else []) + _full_rows(model),
    }


def _lora_rows(model: nn.Module) -> list[dict[str, Any]]:
    from peft.tuners.lora import LoraLayer

    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.r:
            d, k = module.get_base_layer().weight.shape
            rank = next(iter(module.r.values()))
            _add(rows, name, d, k, lora=rank * (d + k))
    return list(rows.values())


def _full_rows(model: nn.Module) -> list[dict[str, Any]]:
    """The weight matrices trained in full; LoRA's own A and B matrices are counted as LoRA."""
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or not module.weight.requires_grad:
            continue
        if any(part.startswith("lora_") for part in name.split(".")) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))  # a tied output head is the embedding, not a new matrix
        d, k = module.weight.shape
        # peft trains a copy of a fully trained module as <name>.modules_to_save.<adapter>.
        _add(rows, name.split(".modules_to_save.")[0], d, k, lora=None)
    return list(rows.values())


def _add(rows: dict, name: str, d: int, k: int, lora: int | None) -> None:
    module = name.rsplit(".", 1)[-1]
    row = rows.setdefault(
        (module, d, k),
        {
            "module": module,
            "shape": [d, k],
            "count": 0,
            "full": d * k,
            "lora": lora,
            "ratio": round(d * k / lora, 2) if lora else None,
        },
    )
    row["count"] += 1
