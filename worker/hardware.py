"""What this machine's hardware does fast."""

from __future__ import annotations

from pathlib import Path

import torch


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: CUDA that supports it, or a CPU with bf16 instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags
