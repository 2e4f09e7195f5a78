"""Tool calling through the inference server: a request's tools and earlier calls render exactly as
the SFT recipe rendered the conversations a tool-calling fine-tune learnt from, and the calls the
model writes come back in OpenAI's shape (message.tool_calls, finish_reason "tool_calls"), in a
plain reply and in a stream."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from worker.inference import requests as checks
from worker.inference.chat import CausalModel
from worker.inference.server import Completion
from worker.recipes import sft

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_a_request_with_tools_is_the_prompt_the_fine_tune_trained_on(tokenizer):
    request = checks.chat_request({"tools": OPENAI_TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
    ]})
    served, _ = CausalModel.prompt_ids(SimpleNamespace(tokenizer=tokenizer, context=2048), request)
    row = {"messages": [*request.messages, {"role": "assistant", "content": "It is 20."}], "tools": [WEATHER]}
    trained = sft.tokenize_example(row, tokenizer, 2048)
    labels = trained["labels"]
    answer_starts = max(i for i in range(1, len(labels)) if labels[i] != sft.IGNORE_INDEX == labels[i - 1])
    assert served == trained["input_ids"][:answer_starts]
    assert "<tools>" in tokenizer.decode(served) and "<tool_response>" in tokenizer.decode(served)


def completion() -> Completion:
    reply = SimpleNamespace(prompt=[1, 2, 3], generated=[4, 5])
    return Completion("ft:tools", reply, SimpleNamespace(completion_tokens=0))


def test_a_written_call_is_returned_as_tool_calls():
    message, reason = completion().message(f"Let me check.\n{CALL_TEXT}", "stop", [WEATHER])
    assert reason == "tool_calls" and message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # Without tools in the request the same text is just text.
    assert completion().message(CALL_TEXT, "stop", None) == ({"role": "assistant", "content": CALL_TEXT}, "stop")


def test_a_streamed_call_arrives_whole_before_the_finish():
    async def chunks():
        pieces: asyncio.Queue = asyncio.Queue()
        for piece in ("<tool_call>\n", CALL_TEXT[len("<tool_call>\n"):]):
            pieces.put_nowait((piece, None))
        pieces.put_nowait(("", "stop"))
        work = SimpleNamespace(cancelled=SimpleNamespace(set=lambda: None))
        return [event async for event in completion().events(pieces, work, False, [WEATHER])]

    events = asyncio.run(chunks())
    bodies = [json.loads(event[len("data: "):]) for event in events if event != "data: [DONE]\n\n"]
    deltas = [body["choices"][0]["delta"] for body in bodies]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("<tool_call>" not in (delta.get("content") or "") for delta in deltas)
    [calls] = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert bodies[-1]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "data: [DONE]\n\n"
