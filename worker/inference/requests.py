"""The request bodies the inference server takes, checked into plain records.

The shapes are OpenAI's (chat completions, embeddings) and vLLM's (rerank, classify, for which
OpenAI defines none). Every problem is a BadRequest naming the parameter, which the server
answers with a 400 in OpenAI's error shape. Pure Python: no torch, no tokenizer (the token
limits are checked where the tokenizer is, in chat.py and encoders.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_SEQUENCES = 4
MAX_INPUTS = int(os.environ.get("SPECIALIST_MAX_INPUTS", 256))
"""Texts in one embeddings / classify request, documents in one rerank request."""
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(Exception):
    """A request the server will not run: the message says what is wrong and `param` where."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"
    """Which of max_tokens and max_completion_tokens the caller set (named in a refusal)."""
    tools: list[dict] | None = None
    """The functions the model may call (worker.conversations' canonical tools); None: no tools,
    and the reply is read as text only (tool_choice "none" too)."""


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    encoding_format: str


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None


@dataclass(frozen=True)
class ClassifyRequest:
    inputs: list[str | tuple[str, str]]
    """A text, or a (text, text_pair) for pair classification."""


@dataclass
class Reader:
    """Reads typed parameters out of a JSON object, raising BadRequest that names them."""

    body: Any
    where: str = ""
    unsupported: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.body, dict):
            raise BadRequest("The request body must be a JSON object.")

    def get(self, name: str, default: Any = None) -> Any:
        value = self.body.get(name)
        return default if value is None else value

    def number(self, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"{name} must be a number, not {_kind(value)}.", name)
        if value > high or value < low or (low_open and value == low):
            bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
            raise BadRequest(f"{name} must be {bound} and at most {high:g}; it is {value:g}.", name)
        return float(value)

    def integer(self, name: str, default: int | None = None, low: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{name} must be an integer, not {_kind(value)}.", name)
        if low is not None and value < low:
            raise BadRequest(f"{name} must be at least {low}; it is {value}.", name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, not {_kind(value)}.", name)
        return value

    def refuse(self, names: dict[str, str]) -> None:
        """A parameter this server does not implement is refused, never silently ignored."""
        for name, why in names.items():
            value = self.body.get(name)
            if value not in (None, False, [], {}):
                raise BadRequest(why, name)


def chat_request(body: Any) -> ChatRequest:
    read = Reader(body)
    read.refuse({
        "functions": "The functions parameter is the older form of tools; send tools instead.",
        "logprobs": "logprobs are not supported by this server.",
        "audio": "Audio output is not supported.",
    })
    n = read.integer("n", 1)
    if n != 1:
        raise BadRequest("n must be 1: this server returns one choice per request.", "n")
    response_format = read.get("response_format", {"type": "text"})
    if not isinstance(response_format, dict) or response_format.get("type", "text") != "text":
        raise BadRequest("Only response_format {\"type\": \"text\"} is supported.", "response_format")
    max_tokens, max_tokens_param = read.integer("max_completion_tokens", low=1), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = read.integer("max_tokens", low=1), "max_tokens"
    stream = read.boolean("stream")
    options = read.get("stream_options", {})
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object.", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage must be true or false.", "stream_options.include_usage")
    return ChatRequest(
        messages=_messages(read.get("messages")),
        max_tokens=max_tokens,
        temperature=read.number("temperature", 1.0, 0.0, 2.0),
        top_p=read.number("top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stop(read.get("stop")),
        seed=read.integer("seed"),
        stream=stream,
        include_usage=stream and include_usage,
        max_tokens_param=max_tokens_param,
        tools=_tools(read.get("tools"), read.get("tool_choice", "auto")),
    )


def _tools(value: Any, choice: Any) -> list[dict] | None:
    """OpenAI's tools ([{"type": "function", "function": {name, description, parameters}}]) in the
    canonical form the training side renders; tool_choice "auto" (the default) or "none"."""
    if choice not in ("auto", "none"):
        raise BadRequest('tool_choice must be "auto" or "none": this server lets the model decide.', "tool_choice")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects.", "tools")
    tools = []
    for index, tool in enumerate(value):
        spec = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise BadRequest(f"tools[{index}] must be a function with a name.", f"tools[{index}].function.name")
        parameters = spec.get("parameters", {})
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{index}].function.parameters must be a JSON schema object.",
                             f"tools[{index}].function.parameters")
        tools.append({"name": spec["name"], "description": spec.get("description") or "", "parameters": parameters})
    return None if choice == "none" else tools


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls (OpenAI's shape, arguments as JSON text) as canonical calls."""
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a list of tool calls.", where)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}[{index}] must have a function with a name.", f"{where}[{index}].function.name")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}[{index}].function.arguments must be a JSON object (as text).",
                             f"{where}[{index}].function.arguments")
        calls.append({"name": function["name"], "arguments": arguments})
    return calls


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {role, content} objects.", "messages")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"messages holds {len(value)} messages; at most {MAX_MESSAGES} are taken.", "messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with a role and a content.", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(CHAT_ROLES)}; it is {role!r}.", f"{where}.role")
        content = _content(message.get("content"), f"{where}.content", allow_empty=role == "assistant")
        canonical = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            canonical["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        messages.append(canonical)
    if messages[-1]["role"] == "assistant":
        raise BadRequest("The last message must be the user's (or the system's), not the assistant's.",
                         f"messages[{len(messages) - 1}].role")
    return messages


def _content(value: Any, where: str, allow_empty: bool) -> str:
    if value is None and allow_empty:
        return ""
    if isinstance(value, list):  # content parts: only text ones
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}[{index}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                 "images and audio are not supported.", f"{where}[{index}]")
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string, not {_kind(value)}.", where)
    if not value.strip() and not allow_empty:
        raise BadRequest(f"{where} is empty.", where)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a non-empty string or a list of them.", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences; it has {len(stops)}.", "stop")
    return tuple(stops)


def embeddings_request(body: Any) -> EmbeddingsRequest:
    read = Reader(body)
    read.refuse({"dimensions": "dimensions is not supported: the model's embeddings have a fixed size."})
    encoding = read.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be 'float' or 'base64'; it is {encoding!r}.", "encoding_format")
    return EmbeddingsRequest(texts=_texts(read.get("input"), "input"), encoding_format=encoding)


def _texts(value: Any, name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise BadRequest(f"{name} must be a string or a non-empty list of strings.", name)
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"{name} holds {len(texts)} items; at most {MAX_INPUTS} are taken per request.", name)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            what = "token ids are not supported; send text" if isinstance(text, int | list) else f"not {_kind(text)}"
            raise BadRequest(f"{name}[{index}] must be a string: {what}.", f"{name}[{index}]")
        if not text.strip():
            raise BadRequest(f"{name}[{index}] is empty.", f"{name}[{index}]")
    return texts


def rerank_request(body: Any) -> RerankRequest:
    read = Reader(body)
    query = read.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("query must be a non-empty string.", "query")
    documents = read.get("documents")
    if isinstance(documents, list):  # vLLM also takes {"text": ...} objects
        documents = [d.get("text") if isinstance(d, dict) else d for d in documents]
    return RerankRequest(query=query, documents=_texts(documents, "documents"), top_n=read.integer("top_n", low=1))


def classify_request(body: Any) -> ClassifyRequest:
    read = Reader(body)
    value = read.get("input")
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list) or not items:
        raise BadRequest("input must be a string, a [text, text_pair] pair, or a non-empty list of them.", "input")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"input holds {len(items)} items; at most {MAX_INPUTS} are taken per request.", "input")
    inputs: list[str | tuple[str, str]] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            item = [item.get("text"), item.get("text_pair")]
        if isinstance(item, list):
            if len(item) != 2 or not all(isinstance(t, str) and t.strip() for t in item):
                raise BadRequest(f"input[{index}] must be a pair of two non-empty strings [text, text_pair].",
                                 f"input[{index}]")
            inputs.append((item[0], item[1]))
        elif isinstance(item, str) and item.strip():
            inputs.append(item)
        else:
            raise BadRequest(f"input[{index}] must be a non-empty string or a [text, text_pair] pair.",
                             f"input[{index}]")
    return ClassifyRequest(inputs=inputs)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


KINDS = ("chat", "embed", "rerank", "classify")


@dataclass(frozen=True)
class Target:
    """What the web app asks the server to run a request on (it has checked that the user may).

    `base` is a catalog key or a model folder; `adapter` a LoRA adapter folder trained on it;
    `model` a whole model's folder (a full fine-tune, or a merged one), used instead of the base.
    A base alone is the base model's own answer: for a reranker without a model, the base
    encoder's cosine similarity; for a classifier, the base with the job's untrained head
    (`labels`, drawn from `seed`: the model the job measured at step 0).
    """

    name: str
    kind: str
    base: str
    adapter: str | None = None
    model: str | None = None
    labels: tuple[str, ...] = ()
    seed: int = 0


def target(value: Any) -> Target:
    if not isinstance(value, dict):
        raise BadRequest("The request names no target model.", "target")
    kind, base = value.get("kind"), value.get("base")
    if kind not in KINDS or not isinstance(base, str) or not base:
        raise BadRequest("The target needs a kind (one of chat, embed, rerank, classify) and a base.", "target")
    labels = value.get("labels") or ()
    return Target(name=str(value.get("name") or base), kind=kind, base=base, adapter=value.get("adapter") or None,
                  model=value.get("model") or None, labels=tuple(str(label) for label in labels),
                  seed=int(value.get("seed") or 0))
