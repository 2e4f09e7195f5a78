"""Conversations in their canonical form, and how they meet a chat template. Pure Python (no
torch, no tokenizer import): the web side reads it to show and check rows, the recipes to
render them.

A canonical message is {"role": "system" | "user" | "assistant" | "tool", "content": text},
and an assistant message may carry "tool_calls": [{"name": ..., "arguments": {...}}] (its
content may then be empty). A row's tools are [{"name", "description", "parameters"}].

Rows of the generative families hold either the flat fields (instruction / response, prompt /
chosen / rejected, prompt / completion) or, when there is more than one exchange or any tool,
the conversation itself:
- instruction tuning: {"messages": the whole conversation, ending with an assistant turn,
  optional "tools"};
- preference tuning (DPO, KTO): {"prompt_messages": the turns before the answer, ending with a
  user or tool turn, optional "tools"} beside the flat answer fields.

Templates that know tools (their source reads `tools` and `tool_calls`) get them as
transformers passes them (`tools=`, OpenAI-shaped `tool_calls`). A template that does not
(SmolLM2's) gets the tools in the system message and each call as a
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` line in the assistant's text, the
results as a user turn in <tool_response> tags: the Hermes format Qwen's templates write
natively, so what is learnt reads the same as on a base that has it.
"""

from __future__ import annotations

import json
import re
from typing import Any

CONVERSATION_FIELDS = frozenset({"messages", "prompt_messages"})
"""The fields that hold a conversation instead of the flat fields."""
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def prompt_messages(row: dict) -> list[dict]:
    """The canonical turns a row's answer follows (for an instruction-tuning conversation, the
    turns before its last assistant message)."""
    if "prompt_messages" in row:
        return list(row["prompt_messages"])
    if "messages" in row:
        messages = row["messages"]
        return list(messages[:-1]) if messages and messages[-1]["role"] == "assistant" else list(messages)
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    text = row.get("instruction", row.get("prompt", ""))
    user = f"{text}\n\n{row['input']}" if row.get("input") else text
    return messages + [{"role": "user", "content": user}]


def conversation(row: dict) -> list[dict]:
    """The whole canonical conversation of an instruction-tuning row."""
    if "messages" in row:
        return list(row["messages"])
    return prompt_messages(row) + [{"role": "assistant", "content": row["response"]}]


def last_reply(row: dict) -> dict:
    """The final assistant message of an instruction-tuning row."""
    return conversation(row)[-1]


def reply_text(message: dict) -> str:
    """An assistant message as the text it is trained to write (tool calls in the Hermes format)."""
    calls = [f"<tool_call>\n{json.dumps(call_json(call), ensure_ascii=False)}\n</tool_call>"
             for call in message.get("tool_calls") or ()]
    return "\n".join(([message["content"]] if message.get("content") else []) + calls)


def call_json(call: dict) -> dict:
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and tool calls itself."""
    return bool(template) and "tools" in template and "tool_calls" in template


def for_template(messages: list[dict], tools: list[dict] | None, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as apply_chat_template takes them: OpenAI-shaped tool calls and tools for a
    template that knows tools; plain user / assistant text in the Hermes format for one that does not."""
    if native:
        rendered = []
        for message in messages:
            out = {"role": message["role"], "content": message.get("content", "")}
            if message.get("tool_calls"):
                out["tool_calls"] = [{"type": "function", "function": call_json(call)}
                                     for call in message["tool_calls"]]
            rendered.append(out)
        return rendered, ([{"type": "function", "function": tool} for tool in tools] if tools else None)
    rendered = []
    for message in messages:
        role = message["role"]
        if role == "assistant":
            rendered.append({"role": "assistant", "content": reply_text(message)})
        elif role == "tool":
            text = f"<tool_response>\n{message['content']}\n</tool_response>"
            if rendered and rendered[-1]["role"] == "user" and rendered[-1]["content"].endswith("</tool_response>"):
                rendered[-1] = {"role": "user", "content": rendered[-1]["content"] + "\n" + text}
            else:
                rendered.append({"role": "user", "content": text})
        else:
            rendered.append({"role": role, "content": message["content"]})
    if tools:
        listing = "\n".join(json.dumps(compact(tool), ensure_ascii=False) for tool in tools)
        preamble = (
            "You may call one or more functions to assist with the user query. The functions are "
            f"listed in <tools></tools>:\n<tools>\n{listing}\n</tools>\nFor each call, return a JSON "
            'object with the function name and arguments in <tool_call></tool_call> tags: '
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{preamble}"}
        else:
            rendered.insert(0, {"role": "system", "content": preamble})
    return rendered, None


def compact(tool: dict) -> dict:
    """A tool as one short JSON line for the Hermes listing: a JSON-schema object's properties
    shortened to name: type (a dozen tools must leave room in the context for the conversation)."""
    parameters = tool.get("parameters") or {}
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if isinstance(properties, dict):
        parameters = {name: spec.get("type", "any") if isinstance(spec, dict) else spec
                      for name, spec in properties.items()}
    return {"name": tool["name"], **({"description": tool["description"]} if tool.get("description") else {}),
            "parameters": parameters}


def template_prompt(row: dict, tokenizer) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of the turns a row's answer follows, as the tokenizer's chat template takes
    them: what the SFT, DPO and KTO recipes render and generate from."""
    return for_template(prompt_messages(row), row.get("tools"), template_knows_tools(tokenizer.chat_template))


def parse_tool_calls(text: str) -> list[dict]:
    """The tool calls a model wrote: each <tool_call>{json}</tool_call>, or the whole reply when it
    is one JSON object with a name (what templates with native tool support make the model write)."""
    found = TOOL_CALL.findall(text)
    candidates = found or [text.strip()]
    calls = []
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = to_json_value(value.get("arguments", value.get("parameters", {})))
            calls.append({"name": value["name"], "arguments": arguments})
    return calls


def transcript(row: dict, limit: int = 300) -> str:
    """A conversation row as short readable text, for previews."""
    lines = [f"tools: {', '.join(tool['name'] for tool in row['tools'])}"] if row.get("tools") else []
    turns = row.get("messages") or row.get("prompt_messages") or []
    for message in turns:
        text = reply_text(message) if message["role"] == "assistant" else message["content"]
        lines.append(f"{message['role']}: {text}")
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_json_value(value: Any) -> Any:
    """Tool arguments and results compared as JSON (key order and spacing do not matter)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
