"""Conversations: every common shape read into the canonical rows, the loss on exactly the
assistant turns (token by token against the template's own rendering), whole turns kept when a
conversation is too long, tool calls rendered natively or in the Hermes format, and a tiny model
that learns a two-turn pattern."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.support.model_fixtures import number_word, write_jsonl
from webapp.datasets.parsing import parse_dataset, propose_task
from worker.conversations import for_template, parse_tool_calls, prompt_messages, reply_text
from worker.events import Reporter
from worker.recipes import dpo, sft
from worker.spec import TrainSpec

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "It is 20 degrees."},
]
TWO_TURNS = [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."},
]

# (task, the file's one record, its canonical row, the chat format detected)
SHAPES = {
    "openai multi-turn": ("sft", {"messages": TWO_TURNS}, {"messages": TWO_TURNS}, "openai"),
    "openai single exchange stays flat": (
        "sft", {"messages": [{"role": "developer", "content": "Be brief."}, *TWO_TURNS[:2]]},
        {"system": "Be brief.", "instruction": "Hi", "response": "Hello."}, "openai"),
    "openai text parts are joined": (
        "sft", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]},
        {"instruction": "Hi\n\nthere", "response": "Hello."}, "openai"),
    "openai tool calls": (
        "sft", {"messages": [
            TOOL_CONVERSATION[0],
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'}, TOOL_CONVERSATION[3]],
            "tools": [{"type": "function", "function": WEATHER}]},
        {"messages": TOOL_CONVERSATION, "tools": [WEATHER]}, "openai"),
    "sharegpt function_call and observation with tools as text": (
        "sft", {"conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(CALL)},
            {"from": "observation", "value": '{"temp": 20}'},
            {"from": "gpt", "value": "It is 20 degrees."}], "tools": json.dumps([WEATHER])},
        {"messages": TOOL_CONVERSATION, "tools": [WEATHER]}, "sharegpt"),
    "sharegpt with a system column": (
        "sft", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "system": "Be kind."},
        {"system": "Be kind.", "instruction": "Hi", "response": "Hello."}, "sharegpt"),
    "hermes tool call written in the reply": (
        "sft", {"messages": [TOOL_CONVERSATION[0], {"role": "assistant", "content": f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"},
                             *TOOL_CONVERSATION[2:]], "tools": [WEATHER]},
        {"messages": TOOL_CONVERSATION, "tools": [WEATHER]}, "openai"),
    "glaive functioncall with quoted arguments": (
        "sft", {"messages": [TOOL_CONVERSATION[0], {"role": "assistant", "content": "<functioncall> {\"name\": \"get_weather\", "
                                                    "\"arguments\": '{\"city\": \"Paris\"}'}"}, *TOOL_CONVERSATION[2:]]},
        {"messages": TOOL_CONVERSATION}, "openai"),
    "dpo flat": ("dpo", {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."},
                 {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, None),
    "dpo sharegpt with message answers": (
        "dpo", {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello."},
                "rejected": {"from": "gpt", "value": "Go."}},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "sharegpt"),
    "dpo sharegpt multi-turn prompt": (
        "dpo", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                  {"from": "human", "value": "Bye"}],
                "chosen": {"from": "gpt", "value": "Goodbye."}, "rejected": {"from": "gpt", "value": "Whatever."}},
        {"prompt_messages": TWO_TURNS[:3], "chosen": "Goodbye.", "rejected": "Whatever."}, "sharegpt"),
    "dpo openai preference fine-tuning": (
        "dpo", {"input": {"messages": [{"role": "user", "content": "Hi"}]},
                "preferred_output": [{"role": "assistant", "content": "Hello."}],
                "non_preferred_output": [{"role": "assistant", "content": "Go."}]},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "openai-preference"),
    "dpo chosen_messages and rejected_messages": (
        "dpo", {"chosen_messages": TWO_TURNS, "rejected_messages": [*TWO_TURNS[:3], {"role": "assistant", "content": "Whatever."}]},
        {"prompt_messages": TWO_TURNS[:3], "chosen": "Goodbye.", "rejected": "Whatever."}, "paired-messages"),
    "dpo chosen and rejected as whole conversations": (
        "dpo", {"chosen": TWO_TURNS[:2], "rejected": [TWO_TURNS[0], {"role": "assistant", "content": "Go."}]},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "paired-messages"),
    "dpo trl conversational prompt": (
        "dpo", {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]},
        {"system": "Be kind.", "prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, None),
    "kto messages with a boolean label": (
        "kto", {"messages": TWO_TURNS[:2], "label": False}, {"prompt": "Hi", "completion": "Hello.", "label": "false"}, "openai"),
    "kto multi-turn prompt": (
        "kto", {"messages": TWO_TURNS, "label": True},
        {"prompt_messages": TWO_TURNS[:3], "completion": "Goodbye.", "label": "true"}, "openai"),
}


@pytest.mark.parametrize(("task", "record", "row", "chat_format"), SHAPES.values(), ids=SHAPES)
def test_each_shape_reads_into_its_canonical_row(tmp_path, task, record, row, chat_format):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    report = parse_dataset(path, "data.jsonl", task=task, out_path=tmp_path / "rows.jsonl")
    assert (report.fatal, report.errors) == (None, [])
    assert report.chat_format == chat_format
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == row
    assert propose_task(report.columns) == task


BAD_ROWS = {
    "a tool result with no call": ({"messages": [TWO_TURNS[0], {"role": "tool", "content": "1"}, TWO_TURNS[1]]},
                                   "message 2 is a tool result with no tool call before it"),
    "a call to a tool not in the list": ({"messages": TOOL_CONVERSATION, "tools": [{"name": "search"}]},
                                         "message 2 calls 'get_weather', which is not in the row's tools (search)"),
    "arguments that are not JSON": (
        {"messages": [TWO_TURNS[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
        "the arguments of message 2's call to f is not valid JSON"),
    "an image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                                    TWO_TURNS[1]]}, "holds image_url content; this server trains text models"),
    "an images column": ({"messages": TWO_TURNS, "images": ["a.jpg"]}, "the row has images; this server trains text models"),
    "no final reply": ({"messages": TWO_TURNS[:3]}, "does not end with an assistant reply"),
}


@pytest.mark.parametrize(("record", "message"), BAD_ROWS.values(), ids=BAD_ROWS)
def test_a_conversation_that_cannot_train_is_refused_with_its_line_and_message(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": TWO_TURNS}, record])
    report = parse_dataset(path, "data.jsonl")
    assert report.rows_ok == 1 and [error.line for error in report.errors] == [2]
    assert message in report.errors[0].problem


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def labelled_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                             if label != sft.IGNORE_INDEX])


def test_the_loss_covers_exactly_the_assistant_turns_token_by_token(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}, *TWO_TURNS]}
    example = sft.tokenize_example(row, tokenizer, 512)
    full = tokenizer.apply_chat_template(row["messages"], return_dict=False)
    assert example["input_ids"] == full
    # Each assistant turn, rendered on its own: the tokens between the conversation up to it (with the
    # assistant header) and the conversation through it are exactly the labelled ones, in order.
    expected = [sft.IGNORE_INDEX] * len(full)
    for i, message in enumerate(row["messages"]):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(row["messages"][:i], add_generation_prompt=True, return_dict=False))
            end = len(tokenizer.apply_chat_template(row["messages"][: i + 1], return_dict=False))
            expected[start:end] = full[start:end]
    assert example["labels"] == expected
    assert labelled_text(tokenizer, example) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    last = sft.tokenize_example(row, tokenizer, 512, loss_on_turns="last")
    assert labelled_text(tokenizer, last) == "Goodbye.<|im_end|>\n" and last["input_ids"] == full


def test_a_long_conversation_keeps_whole_turns_from_the_start(tokenizer):
    row = {"messages": TWO_TURNS}
    first_two = len(tokenizer.apply_chat_template(TWO_TURNS[:2], return_dict=False))
    example = sft.tokenize_example(row, tokenizer, first_two + 3)
    assert example["input_ids"] == tokenizer.apply_chat_template(TWO_TURNS[:2], return_dict=False)
    assert example["turns_cut"] == 2 and labelled_text(tokenizer, example) == "Hello.<|im_end|>\n"
    reporter = Reporter()
    sft.kept_examples([(row, example)], first_two + 3, reporter, "training")
    assert any("cut after its last assistant turn that fits, 2 later turns" in e.get("message", "") for e in reporter.events)


def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    example = sft.tokenize_example({"messages": TOOL_CONVERSATION, "tools": [WEATHER]}, tokenizer, 1024)
    text = tokenizer.decode(example["input_ids"])
    assert '<tools>\n{"name": "get_weather"' in text  # SmolLM2's template has no tools: the Hermes format
    assert labelled_text(tokenizer, example) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "It is 20 degrees.<|im_end|>\n")
    assert "<tool_response>\n{\"temp\": 20}\n</tool_response>" in text


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_knows_tools_renders_them_itself(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = NATIVE_TEMPLATE
    example = sft.tokenize_example({"messages": TOOL_CONVERSATION, "tools": [WEATHER]}, tokenizer, 1024)
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nTOOLS: get_weather<|im_end|>") and "<tool_call>" not in text
    assert labelled_text(tokenizer, example) == (
        'CALL get_weather {"city": "Paris"}<|im_end|>\nIt is 20 degrees.<|im_end|>\n')
    assert "<|im_start|>tool\n{\"temp\": 20}<|im_end|>" in text


def test_a_written_call_reads_back_as_the_call():
    text = reply_text({"role": "assistant", "content": "", "tool_calls": [CALL]})
    assert parse_tool_calls(text) == [CALL] and parse_tool_calls(json.dumps(CALL)) == [CALL]
    assert parse_tool_calls("no call here") == []
    messages, tools = for_template(prompt_messages({"messages": TOOL_CONVERSATION}), [WEATHER], native=False)
    assert tools is None and messages[0]["role"] == "system" and messages[-1]["role"] == "user"


def test_a_multi_turn_preference_prompt_renders_its_turns(tokenizer):
    row = {"prompt_messages": TWO_TURNS[:3], "chosen": "Goodbye.", "rejected": "Whatever."}
    ids = dpo.tokenize_pair(row, tokenizer)
    assert ids["prompt"] == tokenizer.apply_chat_template(TWO_TURNS[:3], add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids["chosen"]) == "Goodbye.<|im_end|>\n"


def two_turn_rows(count: int) -> list[dict]:
    """The first reply names the number; the second, asked the same way every time, repeats it in
    another format: only a model that reads the earlier turns can learn the second."""
    return [{"messages": [
        {"role": "user", "content": f"Say the word for {n}."}, {"role": "assistant", "content": f"WORD: {number_word(n)}."},
        {"role": "user", "content": "Again, shouting."}, {"role": "assistant", "content": f"LOUD {number_word(n).upper()}!"},
    ]} for n in range(count)]


@pytest.mark.slow
@pytest.mark.learning
def test_a_tiny_model_learns_a_two_turn_pattern(tiny_llama_dir, tmp_path, token_cache_dir):
    data = write_jsonl(tmp_path / "turns.jsonl", two_turn_rows(48))
    spec = TrainSpec(base_model=str(tiny_llama_dir), dataset_path=str(data), output_dir=str(tmp_path / "job"),
                     method="full", learning_rate=3e-3, max_steps=30, batch_size=8, max_seq_length=128,
                     eval_every=40, validation_fraction=0.1)
    reporter = Reporter()
    result = sft.run(spec, reporter)
    before, after = result["metrics_before"]["eval_loss"], result["metrics_after"]["eval_loss"]
    assert after < before / 3, (before, after)
    # The held-out samples answer the second turn: the shout names the number of the first turn.
    for sample in result["samples"]:
        assert sample["after"].startswith("LOUD"), result["samples"]
        assert sample["reference"].startswith("LOUD")


@pytest.fixture
def token_cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPECIALIST_TOKEN_CACHE", str(tmp_path / "token-cache"))
    return tmp_path / "token-cache"


def tool_rows(count: int) -> list[dict]:
    """Four tools, chosen by the request's wording: learnable by a tiny model in a few dozen steps
    (trained through the worker in test_tasks_end_to_end)."""
    tools = [{"name": name, "description": "", "parameters": {}} for name in ("get_weather", "get_time", "play_music", "define_word")]
    asks = {"get_weather": "What is the weather in {}?", "get_time": "What time is it in {}?",
            "play_music": "Play music from {}.", "define_word": "What is the meaning of {}?"}
    cities = ["Paris", "Lima", "Oslo", "Tokyo", "Cairo", "Riga", "Seoul", "Perth", "Quito", "Dakar", "Hanoi", "Minsk",
              "Accra", "Lagos", "Sofia", "Bern", "Doha", "Kyiv", "Baku", "Male", "Suva", "Apia", "Lome", "Juba"]
    # Every request once (a repeated one would be held out whole): a held-out request names a city
    # the model saw with the other tools, so only the wording tells the tool.
    return [{"messages": [{"role": "user", "content": asks[name].format(cities[(n // 4) % len(cities)])},
                          {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": {}}]}],
             "tools": tools}
            for n in range(count) for name in [list(asks)[n % 4]]]


@pytest.mark.parametrize(("columns", "task"), [
    (["instruction", "output"], "sft"), (["question", "answer", "category"], "sft"), (["prompt", "completion", "label"], "kto"),
    (["text", "label"], "classify"), (["premise", "hypothesis", "label"], "pair"), (["query", "document", "score"], "rerank"),
    (["anchor", "positive"], "embed"), (["text"], "domain"), (["messages", "label"], "kto"), (["a", "b"], None),
])
def test_the_columns_propose_a_task(columns, task):
    assert propose_task(columns) == task
