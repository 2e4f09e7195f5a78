"""Pre-flight: a few rows exactly as the model will see them, token by token.

The tokens come from the worker's own functions (worker.recipes.sft.tokenize_example,
worker.recipes.dpo.tokenize_pair and worker.recipes.kto.tokenize_row), so what is shown is what
trains: each token is marked as carrying loss or masked (the prompt), and the tokens past the
max length, which training cuts off, are marked too. This module imports torch (through the
recipes): only the "cpu" worker imports it (webapp/datasets/tasks.py), never the web process,
which renders the JSON result as escaped HTML (templates/datasets/_preflight.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from worker.quality import read_rows
from worker.recipes import domain, dpo, kto, sft

EXAMPLES = 3
UNLIMITED = 1 << 30  # tokenize without cutting, then mark where max_length cuts


def preflight_examples(
    rows_path: str | Path, task: str, model_dir: str | Path, max_length: int, longest_row: int | None = None
) -> list[dict[str, Any]]:
    """The first rows (and the longest row, when given) as the model sees them."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    wanted = list(dict.fromkeys([1, 2, longest_row or 3]))[:EXAMPLES]
    rows = dict(read_rows(rows_path, only=set(wanted)))
    render = {"sft": sft_example, "dpo": dpo_example, "kto": kto_example, "domain": domain_example}[task]
    return [render(number, rows[number], tokenizer, max_length) for number in wanted if number in rows]


def sft_example(number: int, row: dict, tokenizer, max_length: int) -> dict[str, Any]:
    example = sft.tokenize_example(row, tokenizer, UNLIMITED)
    loss = [label != sft.IGNORE_INDEX for label in example["labels"]]
    return {
        "row": number,
        "sequences": [_sequence("", example["input_ids"], loss, tokenizer, max_length)],
    }


def dpo_example(number: int, row: dict, tokenizer, max_length: int) -> dict[str, Any]:
    ids = dpo.tokenize_pair(row, tokenizer)
    prompt = ids["prompt"]
    return {
        "row": number,
        "sequences": [
            _sequence(
                answer, prompt + ids[answer], [False] * len(prompt) + [True] * len(ids[answer]), tokenizer, max_length
            )
            for answer in ("chosen", "rejected")
        ],
    }


def kto_example(number: int, row: dict, tokenizer, max_length: int) -> dict[str, Any]:
    ids = kto.tokenize_row(row, tokenizer)
    prompt, completion = ids["prompt"], ids["completion"]
    loss = [False] * len(prompt) + [True] * len(completion)
    return {"row": number, "sequences": [_sequence("", prompt + completion, loss, tokenizer, max_length)]}


def domain_example(number: int, row: dict, tokenizer, max_length: int) -> dict[str, Any]:
    """A document's first row of max_length tokens, as packed: the loss is on every token but the
    first. Nothing is cut: the rest of the document trains in the rows that follow."""
    ids = domain.tokenize([row], tokenizer)[0]
    shown = _sequence("", ids[:max_length], [False] + [True] * (min(len(ids), max_length) - 1), tokenizer, max_length)
    return {"row": number, "sequences": [shown | {"tokens": len(ids)}]}


def _sequence(name: str, ids: list[int], loss: list[bool], tokenizer, max_length: int) -> dict[str, Any]:
    trained = sum(loss[:max_length])
    return {
        "name": name,
        "tokens": len(ids),
        "trained": trained,
        "cut": max(0, len(ids) - max_length),
        "skipped": trained == 0,
        "spans": token_spans(ids, loss, tokenizer, max_length),
    }


def token_spans(ids: list[int], loss: list[bool], tokenizer, max_length: int) -> list[dict[str, Any]]:
    """One span per token, as text; a token that is only part of a character (byte-level BPE)
    is joined with the next ones until the text decodes."""
    spans = []
    start = 0
    while start < len(ids):
        end = start + 1
        text = tokenizer.decode(ids[start:end])
        while "\ufffd" in text and end < len(ids) and end - start < 4:
            end += 1
            text = tokenizer.decode(ids[start:end])
        spans.append(
            {
                "text": text,
                "tokens": end - start,
                "loss": loss[start],
                "past_cutoff": start >= max_length,
                "at_cutoff": start <= max_length < end,
            }
        )
        start = end
    return spans
