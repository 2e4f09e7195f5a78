"""Chat completions on a causal LM: one loaded base, many adapters, continuous batching.

A `CausalModel` is one loaded model (a base with its attached LoRA adapters, or a whole full
fine-tune) and the one `Batch` of conversations it is generating. Each engine turn:

1. admit: the conversations that arrived since the last turn are prefilled together (left-padded,
   mixed adapters in one forward pass through peft's ``adapter_names``) and merged into the
   running batch: their key/value caches are padded on the left to the batch's length;
2. step: one token for every row of the batch, each row through its own adapter ("__base__"
   for the base), sampled with its own temperature, top-p and seeded generator;
3. finished rows (a stop token, a stop string, the token limit, or a client that went away) leave
   the batch at once, freeing their slot.

Replies use the model's chat template and stop at its own end-of-turn tokens (the
generation config's eos ids and the tokenizer's), so an exported model that never stops on its
own still stops here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.conversations import for_template, template_knows_tools
from worker.inference.requests import BadRequest, ChatRequest
from worker.inference.resident import adapter_name, tensor_bytes

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
MAX_PROMPT_TOKENS = int(os.environ.get("SPECIALIST_MAX_PROMPT_TOKENS", 4096))
MAX_OUTPUT_TOKENS = int(os.environ.get("SPECIALIST_MAX_OUTPUT_TOKENS", 1024))
MAX_BATCH = int(os.environ.get("SPECIALIST_MAX_BATCH", 32))
"""Rows generated together; more wait for a slot."""


@dataclass
class Reply:
    """One conversation being answered: its prompt, its settings and what it has produced so far.

    `emit(text, finish_reason)` is called from the engine thread with each new piece of text
    (finish_reason None), then once with the finish reason ("stop" or "length"); `cancelled` is
    set by the server when the client goes away."""

    prompt: list[int]
    adapter: str
    request: ChatRequest
    max_new_tokens: int
    emit: Callable[[str, str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the decoded reply already emitted."""
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.request.temperature > 0:
            self.generator = torch.Generator()
            seed = self.request.seed if self.request.seed is not None else int.from_bytes(os.urandom(6))
            self.generator.manual_seed(seed)


class CausalModel:
    """One loaded causal LM and the batch it is generating (see the module docstring)."""

    def __init__(self, path: str, dtype: torch.dtype, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.path = path
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, attn_implementation="sdpa"
        ).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(self.tokenizer, _generation_config(GenerationConfig, path))
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.adapters: dict[str, str] = {}
        """adapter folder → its name in the peft model."""
        self.active: str | None = None
        """The adapter peft has active (set_adapter), to skip setting it again."""
        self.batch = Batch()
        self.waiting: list[Reply] = []
        self.size = tensor_bytes(self.model)

    # Adapters ------------------------------------------------------------------------------
    def attach(self, folder: str) -> tuple[str, int]:
        """Load the adapter in `folder` onto this base (once); its peft name and its bytes."""
        from peft import PeftModel

        name = adapter_name(folder)
        before = tensor_bytes(self.model)
        if not (Path(folder) / "adapter_model.safetensors").is_file():
            raise BadRequest("The model's adapter is missing from the server's storage (adapter_model.safetensors).",
                             "model", status=503, code="artifact_missing")
        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        else:
            self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
        self.model.eval()
        self.adapters[folder] = name
        self.active = None  # peft may have made the new adapter active
        return name, tensor_bytes(self.model) - before

    def detach(self, folder: str) -> None:
        name = self.adapters.pop(folder, None)
        if name is None:
            return
        self.active = None
        if self.adapters:
            self.model.delete_adapter(name)
        else:  # the last one: back to the plain base (peft keeps no adapter-less PeftModel)
            self.model = self.model.unload().eval()

    def adapter_in_use(self, folder: str) -> bool:
        name = self.adapters.get(folder)
        return any(reply.adapter == name for reply in [*self.batch.replies, *self.waiting])

    def in_use(self) -> bool:
        return bool(self.batch.replies or self.waiting)

    # Requests ------------------------------------------------------------------------------
    def prompt_ids(self, request: ChatRequest) -> tuple[list[int], int]:
        """The conversation through the chat template, and the number of tokens to generate at most."""
        # As the SFT recipe renders a conversation: tools through the template where it knows them,
        # else in the Hermes format a tool-calling fine-tune learnt (worker.conversations).
        messages, tools = for_template(request.messages, request.tools,
                                       template_knows_tools(self.tokenizer.chat_template))
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False, tools=tools)
        limit = min(MAX_PROMPT_TOKENS, self.context - 1)
        if len(prompt) > limit:
            raise BadRequest(f"The messages come to {len(prompt)} tokens; this model takes at most {limit}.",
                             "messages", code="context_length_exceeded")
        room = min(MAX_OUTPUT_TOKENS, self.context - len(prompt))
        wanted = request.max_tokens or room
        if wanted > room:
            param = request.max_tokens_param
            raise BadRequest(f"max_tokens is {wanted}; at most {room} are allowed with this prompt "
                             f"({len(prompt)} prompt tokens, a {self.context}-token context, at most "
                             f"{MAX_OUTPUT_TOKENS} generated).", param)
        return prompt, wanted

    def add(self, reply: Reply) -> None:
        self.waiting.append(reply)

    @torch.inference_mode()
    def turn(self) -> None:
        """Admit what waits (as room allows), then one decoding step for the batch."""
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        room = MAX_BATCH - len(self.batch.replies)
        if self.waiting and room > 0:
            admitted, self.waiting = self.waiting[:room], self.waiting[room:]
            self._prefill(admitted)
        elif self.batch.replies:
            self._step()
        self._finish_rows()

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str]):
        """The last position's logits, each row through its adapter. A batch on one adapter takes
        peft's plain path (set_adapter), a mixed one its per-row path (adapter_names)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "past_key_values": cache, "use_cache": True}
        if not self.adapters:
            return self.model(**inputs).logits[:, -1, :]
        if len(set(adapters)) > 1 or adapters[0] == BASE_ADAPTER:
            # Base rows go through peft's per-row path too: entering disable_adapter() at every
            # step costs more than a decoding step (bench/inference.py).
            return self.model(**inputs, adapter_names=adapters).logits[:, -1, :]
        if self.active != adapters[0]:  # set_adapter walks every LoRA layer: only on a change
            self.model.set_adapter(adapters[0])
            self.active = adapters[0]
        return self.model(**inputs).logits[:, -1, :]

    def _prefill(self, replies: list[Reply]) -> None:
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in replies)
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in replies], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in replies], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in replies])
        tokens = sample(logits, replies)
        self.batch.merge(Batch(replies, cache, mask, mask.sum(-1), tokens))
        for reply, token in zip(replies, tokens.tolist(), strict=True):
            self._accept(reply, token)

    def _step(self) -> None:
        batch = self.batch
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=-1)
        logits = self._forward(batch.tokens[:, None], mask, batch.positions[:, None], batch.cache,
                               [r.adapter for r in batch.replies])
        batch.mask, batch.positions = mask, batch.positions + 1
        batch.tokens = sample(logits, batch.replies)
        for reply, token in zip(batch.replies, batch.tokens.tolist(), strict=True):
            self._accept(reply, token)

    def _accept(self, reply: Reply, token: int) -> None:
        """Record one generated token and emit the text it completes (None: the reply goes on)."""
        if reply.cancelled.is_set():
            return
        if token in self.stop_ids:
            self._flush(reply, "stop")
            return
        reply.generated.append(token)
        text = self.tokenizer.decode(reply.generated, skip_special_tokens=True)
        cut = _first_stop(text, reply.request.stop)
        if cut is not None:
            self._flush(reply, "stop", text[:cut])
        elif len(reply.generated) >= reply.max_new_tokens:
            self._flush(reply, "length", text)
        else:
            safe = len(text) - _held_back(text, reply.request.stop)
            if safe > reply.sent:
                reply.emit(text[reply.sent:safe], None)
                reply.sent = safe

    def _flush(self, reply: Reply, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(reply.generated, skip_special_tokens=True)
        if len(text) > reply.sent:
            reply.emit(text[reply.sent:], None)
            reply.sent = len(text)
        reply.emit("", reason)
        reply.cancelled.set()  # done: the row leaves the batch

    def _finish_rows(self) -> None:
        keep = [i for i, reply in enumerate(self.batch.replies) if not reply.cancelled.is_set()]
        if len(keep) < len(self.batch.replies):
            self.batch.select(keep)


@dataclass
class Batch:
    """The rows being generated together: their key/value cache, attention mask (0 = padding on
    the left), next position ids and last sampled tokens."""

    replies: list[Reply] = field(default_factory=list)
    cache: object = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def merge(self, new: Batch) -> None:
        if not self.replies:
            self.replies, self.cache, self.mask, self.positions, self.tokens = (
                new.replies, new.cache, new.mask, new.positions, new.tokens)
            return
        width = max(self.mask.shape[1], new.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(new.mask, width, -1)])
        self.positions = torch.cat([self.positions, new.positions])
        self.tokens = torch.cat([self.tokens, new.tokens])
        self.replies = self.replies + new.replies

    def select(self, keep: list[int]) -> None:
        if not keep:
            self.replies, self.cache, self.mask, self.positions, self.tokens = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.replies = [self.replies[i] for i in keep]
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        # Columns that are padding in every remaining row are dropped from the cache.
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, unused:], layer.values[index, :, unused:]
        self.mask = self.mask[:, unused:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def sample(logits: torch.Tensor, replies: list[Reply]) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else top-p sampling from its generator."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    for row, reply in enumerate(replies):
        request = reply.request
        if request.temperature == 0:
            continue
        probs = torch.softmax(logits[row] / request.temperature, -1).cpu()
        if request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        tokens[row] = torch.multinomial(probs, 1, generator=reply.generator).item()
    return tokens


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """The ids that end a reply: the generation config's eos ids, the tokenizer's eos, and the
    chat template's end-of-turn marker when the tokenizer knows it."""
    ids = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(marker) if marker in tokenizer.get_vocab() else None
        if token is not None:
            ids.add(token)
    return ids


def _generation_config(cls, path: str):
    try:
        return cls.from_pretrained(path)
    except OSError:
        return None


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (or an incomplete
    character), and so are not sent yet."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                held = max(held, length)
                break
    return held
