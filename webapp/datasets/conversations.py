"""Conversations as users' files hold them, read into the canonical form of worker.conversations.

Pure Python, one record at a time; a problem with a row raises RowProblem naming the column,
the message and what is wrong, and the parser counts it against that row's line.

Shapes read:
- OpenAI chat (`messages`: role system / developer / user / assistant / tool, `content` as text
  or a list of parts, assistant `tool_calls` with JSON-text arguments, the older
  `function_call`; a `tools` column of {"type": "function", "function": {...}}).
- ShareGPT (`conversations`: from system / human / gpt / function_call / observation, `value`;
  an optional `system` and `tools` column, tools as a list or as JSON text).
- Tool calls written into the assistant's text: `<tool_call>{json}</tool_call>` (Hermes, Qwen)
  and `<functioncall> {json}` (glaive), read as calls when their JSON is a call.
- Preference pairs (for DPO): a conversation (`conversations` or `messages`, or a `prompt` of
  messages) with `chosen` / `rejected` as a message, a list of messages or text; full
  `chosen_messages` / `rejected_messages` (or `chosen` / `rejected` lists) that share the
  prompt; OpenAI's preference fine-tuning rows (`input.messages`, `preferred_output`,
  `non_preferred_output`).
- Labelled single answers (for KTO): a conversation ending with the answer, and a `label`.

Content parts: text parts are joined with a blank line; an image, audio, video or file part is
refused (this server trains text models), as is a row with a non-empty `images`, `videos` or
`audios` column, unless the user chose to drop them (`dropping_media`: the parts, the columns
and the `<image>`-style placeholders in the text are left out, and counted). Nothing is
flattened silently: a turn this module cannot place is a problem with that row, not text glued
onto another turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
    "function_call": "call",
}
"""Role names of the common formats -> canonical role ("call": a ShareGPT tool-call turn)."""
MEDIA_COLUMNS = ("images", "videos", "audios")
_MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file", "input_file"}
_TEXT_PARTS = {"text", "input_text", "output_text"}
_MEDIA_PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")
MEDIA_PROBLEM = "images or audio"
"""The kind of the row problem a media part or column raises (the dataset page offers to drop them)."""
_GLAIVE_CALL = re.compile(r"^\s*<functioncall>\s*(\{.*\})\s*$", re.DOTALL)
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TYPE_NAMES = {list: "a list", dict: "an object", str: "text", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null", bytes: "binary data"}


class RowProblem(Exception):
    """A problem with one row; the parser turns it into a RowError on the row's line."""

    def __init__(self, kind: str, column: str | None, problem: str):
        super().__init__(problem)
        self.kind = kind
        self.column = column
        self.problem = problem


@dataclass
class MediaDrop:
    """What `dropping_media` left out: media parts and media-column entries, in how many rows."""

    items: int = 0
    rows: int = 0
    placeholders: bool = False
    """The current row had a media column: its `<image>` placeholders go with it."""


_dropping: ContextVar[MediaDrop | None] = ContextVar("dropping_media", default=None)


@contextmanager
def dropping_media() -> Iterator[MediaDrop]:
    """Within it, images, audio and video are left out of the rows read (and counted) instead of
    refused: the user's choice on the dataset page."""
    drop = MediaDrop()
    token = _dropping.set(drop)
    try:
        yield drop
    finally:
        _dropping.reset(token)


def _media(column: str, what: str, count: int = 1) -> None:
    """Refuse `what` (a row problem), or leave it out when the user chose to drop media."""
    drop = _dropping.get()
    if drop is None:
        raise RowProblem(MEDIA_PROBLEM, column, f"{what}; this server trains text models, so images, video and "
                         "audio are not read. Remove them, or choose on this dataset's page to drop them.")
    drop.items += count


def describe(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


# One conversation ------------------------------------------------------------------------


def read_messages(value: Any, column: str) -> list[dict]:
    """The canonical messages of a list of messages in any of the shapes above."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _json_text(value, column, "the conversation")
    if value.__class__ is not list or not value:
        got = "nothing" if value is None else "an empty list" if value == [] else describe(value)
        raise RowProblem("not a conversation", column, f"expected a list of messages, got {got}")
    messages: list[dict] = []
    for number, item in enumerate(value, 1):
        messages.append(read_message(item, column, number))
    for number, message in enumerate(messages, 1):
        if message["role"] == "system" and number > 1:
            raise RowProblem("misplaced system message", column, f"message {number} is a system message; "
                             "a system message may only come first")
        if message["role"] == "tool" and (number == 1 or messages[number - 2]["role"] not in ("assistant", "tool")
                                          or not _calls_before(messages, number - 1)):
            raise RowProblem("tool result without a call", column,
                             f"message {number} is a tool result with no tool call before it")
    return messages


def _calls_before(messages: list[dict], index: int) -> bool:
    for message in reversed(messages[:index]):
        if message["role"] == "assistant":
            return bool(message.get("tool_calls"))
        if message["role"] != "tool":
            return False
    return False


def read_message(item: Any, column: str, number: int) -> dict:
    if item.__class__ is not dict:
        raise RowProblem("bad message", column, f"message {number} is {describe(item)}, not an object")
    role_name = item.get("role", item.get("from"))
    role = ROLES.get(role_name.lower()) if isinstance(role_name, str) else None
    if role is None:
        key = "role" if "role" in item or "from" not in item else "from"
        raise RowProblem("unknown role", column, f"message {number} has {key} {str(role_name)[:40]!r}; expected "
                         "one of system, user, assistant, tool (or human, gpt, function_call, observation)")
    text_key = "content" if "content" in item or "value" not in item else "value"
    content = _content(item.get(text_key), column, number, role_name)
    if role == "call":
        return {"role": "assistant", "content": "", "tool_calls": _calls_in_text(content, column, number)}
    message = {"role": role, "content": content or ""}
    if role == "assistant":
        calls = _tool_calls(item, column, number)
        if not calls and content:
            text, calls = _calls_written_in(content, column, number)
            message["content"] = text
        if calls:
            message["tool_calls"] = calls
    if not message["content"].strip() and not message.get("tool_calls"):
        raise RowProblem("empty message", column, f"message {number} ({role_name}) has no text in '{text_key}'")
    return message


def _content(value: Any, column: str, number: int, role_name: str) -> str | None:
    if value is None or value.__class__ is str:
        drop = _dropping.get()
        return _MEDIA_PLACEHOLDER.sub("", value).strip() if value and drop and drop.placeholders else value
    if value.__class__ in (int, float):
        return str(value)
    if value.__class__ is dict and value.get("type") is None:
        return json.dumps(value, ensure_ascii=False)  # a tool result written as an object
    parts = [value] if value.__class__ is dict else value
    if parts.__class__ is not list:
        raise RowProblem("not text", column, f"message {number} ({role_name}) has {describe(value)} as its content")
    texts = []
    for part in parts:
        kind = part.get("type") if part.__class__ is dict else None
        if kind in _MEDIA_PARTS:
            _media(column, f"message {number} ({role_name}) holds {kind} content")
            continue
        text = part.get("text", part.get("value")) if part.__class__ is dict and kind in _TEXT_PARTS else None
        if text.__class__ is not str:
            raise RowProblem("bad content part", column, f"message {number} ({role_name}) has a content part "
                             f"of type {str(kind)[:30]!r}; expected text parts {{\"type\": \"text\", \"text\": ...}}")
        texts.append(text)
    if not texts and parts:
        raise RowProblem("only images or audio", column, f"left out: message {number} ({role_name}) holds only "
                         "images, audio or video, which are dropped (your choice for this dataset)")
    return "\n\n".join(texts)


def _tool_calls(item: dict, column: str, number: int) -> list[dict]:
    raw = item.get("tool_calls")
    if raw is None and item.get("function_call") is not None:
        raw = [{"function": item["function_call"]}]
    if raw is None or raw == []:
        return []
    if raw.__class__ is not list:
        raise RowProblem("bad tool call", column, f"message {number} has tool_calls that are {describe(raw)}, not a list")
    return [_one_call(call.get("function", call) if call.__class__ is dict else call, column, number)
            for call in raw]


def _one_call(call: Any, column: str, number: int) -> dict:
    if call.__class__ is not dict or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise RowProblem("bad tool call", column, f"message {number} has a tool call without a function name")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json_text(arguments, column, f"the arguments of message {number}'s call to {call['name']}") \
            if arguments.strip() else {}
    if arguments.__class__ is not dict:
        raise RowProblem("bad tool call", column, f"message {number} calls {call['name']} with arguments that are "
                         f"{describe(arguments)}, not an object")
    return {"name": call["name"], "arguments": arguments}


def _calls_in_text(text: str | None, column: str, number: int) -> list[dict]:
    value = _json_text(text or "", column, f"the tool call in message {number}")
    calls = value if value.__class__ is list else [value]
    return [_one_call(call, column, number) for call in calls]


def _calls_written_in(text: str, column: str, number: int) -> tuple[str, list[dict]]:
    """(the text left, the calls) of an assistant reply that writes its calls as text."""
    glaive = _GLAIVE_CALL.match(text)
    if glaive:
        return "", [_one_call(_lenient_call(glaive.group(1), column, number), column, number)]
    found = _HERMES_CALL.findall(text)
    if not found:
        return text, []
    calls = [_one_call(_json_text(body, column, f"a <tool_call> in message {number}"), column, number) for body in found]
    return _HERMES_CALL.sub("", text).strip(), calls


def _lenient_call(text: str, column: str, number: int) -> Any:
    # glaive writes the arguments as a single-quoted JSON string: {"name": "f", "arguments": '{"a": 1}'}
    fixed = re.sub(r"'(\{.*\})'", r"\1", text, flags=re.DOTALL)
    return _json_text(fixed, column, f"the <functioncall> in message {number}")


def _json_text(text: str, column: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise RowProblem("not JSON", column, f"{what} is not valid JSON ({error.msg} at column {error.colno})") from None


def read_tools(value: Any, column: str = "tools") -> list[dict]:
    """The canonical tool list of a `tools` value (a list, or JSON text of one); [] when empty."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        value = _json_text(value, column, "the tool list")
    if value.__class__ is not list:
        raise RowProblem("bad tools", column, f"expected a list of tools, got {describe(value)}")
    tools = []
    for number, tool in enumerate(value, 1):
        spec = tool.get("function", tool) if tool.__class__ is dict else tool
        if spec.__class__ is not dict or not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise RowProblem("bad tools", column, f"tool {number} has no name")
        tools.append({"name": spec["name"], "description": spec.get("description", ""),
                      "parameters": spec.get("parameters", {})})
    return tools


def check_calls_known(messages: list[dict], tools: list[dict], column: str) -> None:
    """Every tool call names a tool of the row's list (when the row lists its tools)."""
    if not tools:
        return
    names = {tool["name"] for tool in tools}
    for number, message in enumerate(messages, 1):
        for call in message.get("tool_calls", ()):
            if call["name"] not in names:
                raise RowProblem("unknown tool", column, f"message {number} calls {call['name']!r}, which is not "
                                 f"in the row's tools ({', '.join(sorted(names))})")


def refuse_media(record: dict) -> None:
    """A row with images, videos or audios beside its text: refused, or (dropping) read without them."""
    drop = _dropping.get()
    if drop is not None:
        drop.placeholders = False
    for column in MEDIA_COLUMNS:
        value = record.get(column)
        if value:
            _media(column, f"the row has {column}", len(value) if value.__class__ is list else 1)
            drop.placeholders = True


# Rows of each family ---------------------------------------------------------------------


def sft_row(record: dict, column: str) -> dict:
    """An instruction-tuning row: the flat fields for one exchange, else the conversation."""
    refuse_media(record)
    messages = read_messages(record.get(column), column)
    if isinstance(record.get("system"), str) and record["system"].strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    tools = read_tools(record.get("tools"))
    check_calls_known(messages, tools, column)
    if messages[-1]["role"] != "assistant":
        raise RowProblem("no assistant reply", column, "does not end with an assistant reply")
    exchange = messages[1:] if messages[0]["role"] == "system" else messages
    if not tools and [m["role"] for m in exchange] == ["user", "assistant"] and not exchange[1].get("tool_calls"):
        row = {"instruction": exchange[0]["content"], "response": exchange[1]["content"]}
        if exchange is not messages:
            row["system"] = messages[0]["content"]
        return row
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem("no user message", column, "has no user message")
    return {"messages": messages, **({"tools": tools} if tools else {})}


def prompt_fields(messages: list[dict], tools: list[dict], column: str) -> dict:
    """The prompt of a DPO or KTO row: flat `prompt` (+ `system`) for one user turn, else the turns."""
    if messages[-1]["role"] not in ("user", "tool"):
        raise RowProblem("prompt ends with an answer", column,
                         f"the prompt ends with a {messages[-1]['role']} message; it should end with the user's turn")
    exchange = messages[1:] if messages[0]["role"] == "system" else messages
    if not tools and [m["role"] for m in exchange] == ["user"]:
        return {"prompt": exchange[0]["content"], **({"system": messages[0]["content"]} if exchange is not messages else {})}
    return {"prompt_messages": messages, **({"tools": tools} if tools else {})}


def answer_text(value: Any, column: str) -> str:
    """A chosen / rejected / completion answer: text, one assistant message, or a list ending with one."""
    if value.__class__ is list and value:
        value = value[-1]
    if value.__class__ is dict:
        message = read_message(value, column, 1)
        if message["role"] != "assistant":
            raise RowProblem("not an answer", column, f"the answer is a {message['role']} message, not an assistant one")
        if message.get("tool_calls"):
            raise RowProblem("tool call answer", column, "the answer is a tool call; preference pairs over tool "
                             "calls are not supported yet")
        return message["content"]
    if value.__class__ is str and value.strip():
        return value
    raise RowProblem("missing", column, f"expected the answer's text or message, got {describe(value) if value not in ('', None, []) else 'nothing'}")


def dpo_row(record: dict, shape: str) -> dict:
    """A preference pair from one of the shapes PREFERENCE_SHAPES names."""
    refuse_media(record)
    if shape == "openai":
        source = record.get("input")
        if source.__class__ is not dict:
            raise RowProblem("not a conversation", "input", f"expected an object with messages, got {describe(source)}")
        messages = read_messages(source.get("messages"), "input")
        tools = read_tools(source.get("tools"), "input")
        chosen, rejected = (answer_text(record.get(name), name) for name in ("preferred_output", "non_preferred_output"))
        return {**prompt_fields(messages, tools, "input"), "chosen": chosen, "rejected": rejected}
    if shape == "full":
        names = ("chosen_messages", "rejected_messages") if "chosen_messages" in record else ("chosen", "rejected")
        chosen_turns, rejected_turns = (read_messages(record.get(name), name) for name in names)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise RowProblem("different prompts", names[1], f"{names[0]} and {names[1]} differ before their last "
                             "message; a preference pair answers one conversation two ways")
        for name, turns in zip(names, (chosen_turns, rejected_turns), strict=True):
            if turns[-1]["role"] != "assistant" or len(turns) < 2:
                raise RowProblem("not an answer", name, f"{name} should end with the assistant's answer")
        tools = read_tools(record.get("tools"))
        return {**prompt_fields(chosen_turns[:-1], tools, names[0]),
                "chosen": answer_text(chosen_turns[-1], names[0]), "rejected": answer_text(rejected_turns[-1], names[1])}
    column = shape  # "conversations", "messages" or "prompt": the prompt's turns
    messages = read_messages(record.get(column), column)
    if isinstance(record.get("system"), str) and record["system"].strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    tools = read_tools(record.get("tools"))
    return {**prompt_fields(messages, tools, column),
            "chosen": answer_text(record.get("chosen"), "chosen"), "rejected": answer_text(record.get("rejected"), "rejected")}


def preference_shape(columns: list[str]) -> str | None:
    """Which conversational preference shape a file's columns say it is in ("prompt": decided per
    row, as a `prompt` of messages or flat text); None: flat columns, read through the mapping."""
    names = set(columns)
    if {"input", "preferred_output", "non_preferred_output"} <= names:
        return "openai"
    if {"chosen_messages", "rejected_messages"} <= names:
        return "full"
    if not {"chosen", "rejected"} <= names:
        return None
    for column in ("conversations", "messages", "prompt"):
        if column in names:
            return column
    return "full"


def is_conversational(record: dict, columns: tuple[str, ...] = ("prompt", "chosen", "rejected")) -> bool:
    return any(record.get(column).__class__ in (list, dict) for column in columns)


def kto_row(record: dict, column: str, label: str) -> dict:
    """A labelled answer: the conversation's last assistant message is the completion."""
    refuse_media(record)
    messages = read_messages(record.get(column), column)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise RowProblem("no assistant reply", column, "does not end with an assistant reply")
    tools = read_tools(record.get("tools"))
    value = record.get(label)
    if value is None or value == "":
        raise RowProblem("missing", label, "the label is missing")
    text = ("true" if value else "false") if value.__class__ is bool else str(value)
    return {**prompt_fields(messages[:-1], tools, column),
            "completion": answer_text(messages[-1], column), "label": text}
