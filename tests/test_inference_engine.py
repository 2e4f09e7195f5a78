"""The inference engine in-process, on a tiny llama and adapters made here: adapters in one
batch answer as each does alone, an evicted adapter comes back, stop strings and token limits
hold, a cancelled reply leaves the batch, and a broken adapter fails alone."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.inference import requests as api
from worker.inference.chat import BASE_ADAPTER
from worker.inference.engine import ChatWork, EncodeWork, Engine
from worker.inference.requests import BadRequest
from worker.inference.resident import MIB, Resident


def make_adapter(base_dir, folder, seed: int, targets=("q_proj", "v_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)  # big enough to change a tiny model's greedy answer
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_llama_dir, root / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture
def engine():
    engine = Engine(Resident(4096 * MIB), device="cpu")
    engine.start()
    yield engine
    engine.stop()


class Call:
    """One chat request handed to the engine, and what came back."""

    def __init__(self, engine, base, adapter=None, content="Say the word for 7.", **options):
        self.done, self.pieces, self.reason, self.error, self.reply = threading.Event(), [], None, None, None
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12, **options}
        self.work = ChatWork(api.Target("t", "chat", str(base), adapter=adapter), api.chat_request(body),
                             emit=self._emit, started=self._started, fail=self._fail)
        engine.submit(self.work)

    def _emit(self, text, reason):
        self.pieces.append(text)
        if reason:
            self.reason = reason
            self.done.set()

    def _started(self, reply):
        self.reply = reply

    def _fail(self, exc):
        self.error = exc
        self.done.set()

    def text(self, timeout=60) -> str:
        assert self.done.wait(timeout), "no answer"
        assert self.error is None, self.error.message
        return "".join(self.pieces)


def test_adapters_batched_together_answer_as_each_does_alone(engine, tiny_llama_dir, adapters):
    alone = {a: Call(engine, tiny_llama_dir, a).text() for a in [None, *adapters]}
    assert len(set(alone.values())) == 4, alone  # each adapter changes the answer
    together = [(a, Call(engine, tiny_llama_dir, a)) for a in [None, *adapters, *adapters, None]]
    assert {a: call.text() for a, call in together} == alone
    summary = engine.resident.summary()
    assert summary["loads"][f"base:{tiny_llama_dir}"] == 1
    assert all(summary["loads"][f"adapter:{a}"] == 1 for a in adapters)


def test_an_evicted_adapter_is_loaded_again_and_answers_the_same(tiny_llama_dir, adapters):
    from pathlib import Path

    engine = Engine(Resident(4096 * MIB), device="cpu")
    engine.start()
    try:
        first = Call(engine, tiny_llama_dir, adapters[0]).text()
        # Room for the base and one adapter only: each adapter now evicts the other.
        adapter_file = sum(p.stat().st_size for p in Path(adapters[1]).glob("*.safetensors"))
        engine.resident.budget = engine.resident.used + adapter_file - 1
        Call(engine, tiny_llama_dir, adapters[1]).text()
        assert Call(engine, tiny_llama_dir, adapters[0]).text() == first
        summary = engine.resident.summary()
        assert summary["loads"][f"adapter:{adapters[0]}"] == 2 and summary["evictions"] == 2
        assert summary["loads"][f"base:{tiny_llama_dir}"] == 1
        assert [entry["key"] for entry in summary["resident"]] == [f"base:{tiny_llama_dir}", f"adapter:{adapters[0]}"]
    finally:
        engine.stop()


def test_a_stop_string_ends_the_reply_before_it(engine, tiny_llama_dir, adapters):
    full = Call(engine, tiny_llama_dir, adapters[0], max_tokens=12).text()
    assert len(full) > 4
    stop = full[2:4]
    cut = Call(engine, tiny_llama_dir, adapters[0], max_tokens=12, stop=[stop])
    assert cut.text() == full[:full.find(stop)] and cut.reason == "stop"
    limited = Call(engine, tiny_llama_dir, adapters[0], max_tokens=3)
    limited.text()
    assert limited.reason == "length" and len(limited.reply.generated) == 3


def test_too_many_tokens_is_refused_naming_the_parameter(engine, tiny_llama_dir):
    call = Call(engine, tiny_llama_dir, max_tokens=10**6)
    assert call.done.wait(60) and call.error.status == 400 and call.error.param == "max_tokens"
    call = Call(engine, tiny_llama_dir, content="word " * 5000)
    assert call.done.wait(60) and call.error.param == "messages"


def test_a_cancelled_reply_leaves_the_batch(engine, tiny_llama_dir):
    call = Call(engine, tiny_llama_dir, max_tokens=400, temperature=1.0, seed=1)
    while call.reply is None or not call.reply.generated:
        threading.Event().wait(0.01)
    call.work.cancelled.set()
    model = next(iter(engine.causal.values()))
    for _ in range(500):
        if not model.batch.replies:
            break
        threading.Event().wait(0.01)
    assert not model.batch.replies and len(call.reply.generated) < 400


def test_sampling_with_a_seed_repeats(engine, tiny_llama_dir):
    first = Call(engine, tiny_llama_dir, temperature=1.0, top_p=0.9, seed=7).text()
    assert Call(engine, tiny_llama_dir, temperature=1.0, top_p=0.9, seed=7).text() == first


def test_an_adapter_that_fails_to_load_fails_alone(engine, tiny_llama_dir, adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"nonsense")
    bad = Call(engine, tiny_llama_dir, str(broken))
    good = Call(engine, tiny_llama_dir, adapters[0])
    assert bad.done.wait(60) and isinstance(bad.error, BadRequest)
    assert good.text()
    missing = Call(engine, tiny_llama_dir, str(tmp_path / "nowhere"))
    assert missing.done.wait(60) and missing.error.status == 503


def test_the_base_row_of_a_mixed_batch_uses_no_adapter(engine, tiny_llama_dir, adapters):
    plain = Call(engine, tiny_llama_dir).text()
    Call(engine, tiny_llama_dir, adapters[0]).text()  # the model now carries adapters
    assert Call(engine, tiny_llama_dir, None).text() == plain
    assert BASE_ADAPTER == "__base__"


def test_embeddings_through_an_adapter_match_the_adapter_loaded_by_hand(engine, tiny_bert_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_bert_dir))
    peft_model = get_peft_model(model[0].model, LoraConfig(r=4, target_modules=["query", "value"],
                                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "embed-adapter")
    expected_model = SentenceTransformer(str(tiny_bert_dir))
    expected_model[0].model = PeftModel.from_pretrained(expected_model[0].model, tmp_path / "embed-adapter")
    texts = ["fruit alpha", "a cat"]
    expected = expected_model.encode(texts)

    done, result = threading.Event(), {}
    target = api.Target("e", "embed", str(tiny_bert_dir), adapter=str(tmp_path / "embed-adapter"))
    engine.submit(EncodeWork(target, "embed", (texts,), done=lambda v: (result.update(v=v), done.set()),
                             fail=lambda e: (result.update(e=e), done.set())))
    assert done.wait(60) and "e" not in result
    vectors, tokens = result["v"]
    assert torch.allclose(torch.tensor(vectors), torch.tensor(expected), atol=1e-5) and tokens > 0
