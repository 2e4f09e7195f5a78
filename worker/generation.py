"""Replies of a causal LM to a few held-out conversations, before and after training: what a
person reads to see what changed (the SFT and DPO recipes' samples)."""

from __future__ import annotations

import torch

from worker.hardware import bf16_supported

SAMPLE_COUNT = 3  # held-out instructions answered before and after training
SAMPLE_NEW_TOKENS = 48


@torch.no_grad()
def generate_replies(
    model, tokenizer, conversations: list[list[dict]], tools: list[list[dict] | None] | None = None,
    max_new_tokens: int | list[int] = SAMPLE_NEW_TOKENS,
) -> list[str]:
    """Greedy replies (up to max_new_tokens tokens, or each row's own limit from a list) to each
    conversation (with its tools, as the chat template takes them), in one left-padded batch.

    Rows with a shorter limit ride along in the batch to the longest one and are cut at theirs: a
    greedy reply's first n tokens do not depend on how far it goes on, and on a CPU a few more rows
    in a batch cost much less than a batch of their own (the forgetting meter's general answers
    join the sample replies so)."""
    if not conversations:
        return []
    tools = tools or [None] * len(conversations)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(conversations)
    prompts = [
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True, tools=row_tools
        )
        for messages, row_tools in zip(conversations, tools, strict=True)
    ]
    width = max(len(prompt) for prompt in prompts)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    was_training = model.training
    model.eval()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=_decode_in_bf16(model)):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max(limits),
            do_sample=False,
            pad_token_id=pad_id,
        )
    model.train(was_training)
    replies = [row[width : width + limit] for row, limit in zip(output, limits, strict=True)]
    return [reply.strip() for reply in tokenizer.batch_decode(replies, skip_special_tokens=True)]


def _decode_in_bf16(model) -> bool:
    # On a CPU, decoding a few rows a token at a time is bound by reading the weights, and
    # autocast re-casts every fp32 weight to bf16 at every token: fp32 decodes faster
    # (docs/performance.md, the service path), unless the weights are stored in bf16 already
    # (the SFT recipe's store_frozen_linears_in_bf16).
    stored_bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    return bf16_supported() and (model.device.type != "cpu" or stored_bf16)
