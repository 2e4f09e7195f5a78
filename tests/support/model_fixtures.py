"""Offline models and data for tests (session-scoped; shared by the worker and web tests).

- tiny_llama_dir: a 2-layer llama-style causal LM (hidden 64, 4 heads, 2 key/value heads,
  intermediate 128, tied embeddings), randomly initialised with a fixed seed, with the
  SmolLM2 tokenizer and its chat template. Safetensors, loads like any Hub model.
- minilm_dir: the bundled all-MiniLM-L6-v2 (a sentence-transformers folder).
- tiny_bert_dir: a 2-layer BERT (hidden 32, 4 heads, intermediate 64), randomly initialised
  with a fixed seed, with the MiniLM tokenizer; a plain transformers folder (BertModel weights).
- sft_jsonl: 64 rows of a trivially learnable instruction dataset in the canonical JSONL
  format ({"instruction", "response", optional "system"}).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TINY_LLAMA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    # Wider than the usual 0.02 so the frozen, tied output head can make confident predictions:
    # with 0.02 a LoRA-only run can hardly move the loss of a random model.
    "initializer_range": 0.2,
}
"""The tiny llama's config, for tests that compute parameter counts by hand."""

ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]  # fmt: skip
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    """English words for 0 <= n < 100."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def sft_rows(count: int = 64) -> list[dict[str, str]]:
    rows = []
    for n in range(count):
        row = {"instruction": f"Say the word for {n}.", "response": f"WORD: {number_word(n)}."}
        if n % 4 == 0:
            row["system"] = "Answer with one word."
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session", autouse=True)
def models_root(tmp_path_factory) -> Path:
    """The folder of the tests' tiny models, registered as the server's model folder
    (SPECIALIST_MODEL_DIRS) in this process and in the stack processes started after it."""
    from django.conf import settings

    root = tmp_path_factory.getbasetemp() / "models"
    root.mkdir(exist_ok=True)
    os.environ["SPECIALIST_MODEL_DIRS"] = str(root)
    settings.MODEL_DIRS = [root]
    return root


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted on first use, then cached)."""
    from worker.models import resolve_base

    return Path(resolve_base("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_llama_dir(models_root, smollm2_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out_dir = models_root / "tiny-llama"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", sft_rows())


TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
"""The tiny BERT's config, for tests that compute parameter counts by hand."""


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from worker.models import resolve_base

    return Path(resolve_base("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def tiny_bert_dir(models_root, minilm_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT)
    torch.manual_seed(0)
    model = BertModel(config)
    out_dir = models_root / "tiny-bert"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def wide_bert_dir(models_root, tiny_bert_dir) -> Path:
    """The tiny BERT with wider random weights (std 0.2 instead of 0.02): its frozen layers then
    pass on enough of the input for a head or LoRA adapters to learn from."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, **TINY_BERT
    )
    torch.manual_seed(0)
    out_dir = models_root / "wide-bert"
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
