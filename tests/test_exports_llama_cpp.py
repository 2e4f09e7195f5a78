"""The GGUF export runs in llama.cpp (llama-cpp-python): SmolLM2 with a LoRA adapter, merged and
converted, answers three prompts greedily with the merged model's own first tokens and ends each
reply by itself (finish_reason "stop"), because the chat template and the end-of-turn id travel in
the file. `make test-export` (requirements-export.txt builds llama.cpp; minutes)."""

from __future__ import annotations

import time

import pytest

from tests.test_exports import lora_adapter

pytestmark = [pytest.mark.slow, pytest.mark.export]
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-export` installs it")

PROMPTS = ["What is the capital of France?", "What is 2 + 2?", "Which planet is the largest?"]
FIRST_TOKENS = 8


@pytest.fixture(scope="module")
def merged_smollm2(smollm2_dir, tmp_path_factory):
    """SmolLM2 with an adapter whose B is small noise: the merged model differs from its base but
    still speaks (and stops) like it."""
    from worker.exports import merge

    root = tmp_path_factory.mktemp("smollm2-export")
    adapter = lora_adapter(smollm2_dir, root / "final", b_std=0.002)
    started = time.monotonic()
    merged = merge(adapter, "smollm2-135m-instruct", root / "merged")
    print(f"merge: {time.monotonic() - started:.1f} s")
    return merged


@pytest.fixture(scope="module")
def ggufs(merged_smollm2, tmp_path_factory):
    from worker.gguf_export import to_gguf

    out = tmp_path_factory.mktemp("smollm2-gguf")
    files = {}
    for kind in ("f16", "q8_0"):
        started = time.monotonic()
        files[kind] = to_gguf(merged_smollm2, out / f"{kind}.gguf", kind)
        print(f"gguf {kind}: {time.monotonic() - started:.1f} s, {files[kind].stat().st_size} bytes")
    return files


def transformers_reply(model_dir, prompt: str) -> str:
    """The merged model's first FIRST_TOKENS greedy tokens, as text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=FIRST_TOKENS, do_sample=False)[0][inputs["input_ids"].shape[1]:]
    return tokenizer.decode(output, skip_special_tokens=True)


def test_the_q8_0_file_is_about_half_the_f16_file(ggufs):
    assert 0.5 < ggufs["q8_0"].stat().st_size / ggufs["f16"].stat().st_size < 0.56


def test_llama_cpp_answers_like_the_merged_model_and_stops_by_itself(ggufs, merged_smollm2):
    llm = llama_cpp.Llama(model_path=str(ggufs["f16"]), n_ctx=1024, seed=0, verbose=False)
    for prompt in PROMPTS:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                           max_tokens=256)
        choice = reply["choices"][0]
        text = transformers_reply(merged_smollm2, prompt)
        print(f"{prompt!r}: llama.cpp {choice['message']['content']!r} ({choice['finish_reason']}); "
              f"transformers {text!r}")
        assert choice["finish_reason"] == "stop", "the reply ran to the token limit: the stop token is not set"
        assert choice["message"]["content"].startswith(text)


def test_the_q8_0_file_loads_in_llama_cpp_with_its_template_and_stop_token(ggufs):
    """Q8_0's answers are not compared: this build's quantised kernels answer as badly with the
    Q4_1 GGUF llama.cpp's own converter wrote for SmolLM2 (tests/test_exports.py checks our Q8_0
    blocks against f16 in Python)."""
    llm = llama_cpp.Llama(model_path=str(ggufs["q8_0"]), n_ctx=256, verbose=False)
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == llm.metadata["tokenizer.ggml.eos_token_id"] == "2"
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [2]
