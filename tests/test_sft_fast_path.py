"""The SFT recipe's speed levers keep it correct: logits on response positions only give the
model's own loss, tokenised rows are reused between jobs, gradient checkpointing trains the same."""

import json

import pytest
import torch

from worker import token_cache
from worker.events import Reporter
from worker.generation import SAMPLE_COUNT, generate_replies
from worker.hardware import bf16_supported
from worker.models import apply_method, load_causal_lm
from worker.recipes import sft
from worker.spec import TrainSpec


def make_spec(base, data, out, **overrides) -> TrainSpec:
    settings = dict(max_steps=4, batch_size=4, max_seq_length=64, validation_fraction=0.1, learning_rate=1e-2)
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


@pytest.fixture
def token_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIST_TOKEN_CACHE", str(tmp_path / "tokenized"))
    return tmp_path / "tokenized"


def test_the_response_only_loss_equals_the_models_own_loss(tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path)
    model, tokenizer = load_causal_lm(spec)
    train_rows, _, _ = sft.prepare_data(spec, tokenizer, Reporter())
    batch = sft.pad_batch(train_rows[:6], tokenizer.pad_token_id)
    assert (batch["input_ids"] != tokenizer.pad_token_id).any(dim=1).all()
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    kept = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 logits_to_keep=batch["logits_to_keep"])
    assert kept.logits.shape[0] == (batch["labels"][:, 1:] != sft.IGNORE_INDEX).sum() < batch["labels"].numel() / 2
    torch.testing.assert_close(sft.response_loss(kept, batch["labels"]), full.loss, rtol=1e-5, atol=1e-6)


def test_a_second_job_on_the_same_file_reuses_the_tokenised_rows(tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path)
    _, tokenizer = load_causal_lm(spec)
    first, second = Reporter(), Reporter()
    assert sft.prepare_data(spec, tokenizer, first) == sft.prepare_data(spec, tokenizer, second)
    reused = [e for e in second.events if "reused" in e.get("message", "")]
    assert not [e for e in first.events if "reused" in e.get("message", "")] and len(reused) == 1
    [entry] = token_cache_dir.glob("*.json")
    json.loads(entry.read_text())  # plain JSON, never pickle


def test_anything_that_changes_the_tokens_changes_the_cache_key(tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir):
    _, tokenizer = load_causal_lm(make_spec(tiny_llama_dir, sft_jsonl, tmp_path))
    key = token_cache.cache_key(sft_jsonl, tokenizer, 64, sft.TOKENIZE_VERSION)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(sft_jsonl.read_bytes() + b'{"instruction": "one more", "response": "row"}\n')
    assert token_cache.cache_key(edited, tokenizer, 64, sft.TOKENIZE_VERSION) != key
    assert token_cache.cache_key(sft_jsonl, tokenizer, 65, sft.TOKENIZE_VERSION) != key
    assert token_cache.cache_key(sft_jsonl, tokenizer, 64, "another version") != key
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert token_cache.cache_key(sft_jsonl, tokenizer, 64, sft.TOKENIZE_VERSION) != key


def test_a_damaged_cache_entry_is_tokenised_again(tiny_llama_dir, sft_jsonl, tmp_path, token_cache_dir):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path)
    _, tokenizer = load_causal_lm(spec)
    expected = sft.prepare_data(spec, tokenizer, Reporter())
    [entry] = token_cache_dir.glob("*.json")
    entry.write_text('[{"input_ids": [1, 2')
    assert sft.prepare_data(spec, tokenizer, Reporter()) == expected


def test_gradient_checkpointing_trains_the_same_as_keeping_activations(tiny_llama_dir, sft_jsonl, tmp_path,
                                                                        token_cache_dir):
    def losses(**overrides) -> list[float]:
        reporter = Reporter()
        spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / str(overrides), validation_fraction=0, **overrides)
        sft.run(spec, reporter)
        return [e["loss"] for e in reporter.events if e["kind"] == "metric"]

    for method in ("lora", "full"):
        plain, checkpointed = losses(method=method), losses(method=method, gradient_checkpointing=True)
        assert len(plain) == 4 and checkpointed == pytest.approx(plain, rel=2e-3)


def test_a_lora_jobs_replies_before_training_are_the_untouched_base_models(tiny_llama_dir, sft_jsonl, tmp_path,
                                                                            token_cache_dir):
    # The "before" replies of an adapter job are generated after training with the adapters off.
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "job", validation_fraction=0.2, max_steps=6)
    samples = sft.run(spec, Reporter())["samples"]
    base, tokenizer = load_causal_lm(spec)
    if bf16_supported():  # the job's frozen weights were stored in bf16 (the same matmuls)
        sft.store_frozen_linears_in_bf16(base.requires_grad_(False))
    _, _, held_out = sft.prepare_data(spec, tokenizer, Reporter())
    prompts = [sft.template_messages(row, tokenizer, prompt_only=True)[0] for row in held_out[:SAMPLE_COUNT]]
    assert [sample["before"] for sample in samples] == generate_replies(base, tokenizer, prompts)
    assert [sample["before"] for sample in samples] != [sample["after"] for sample in samples]


def test_storing_the_frozen_linears_in_bf16_changes_no_number_under_autocast(tiny_llama_dir, sft_jsonl, tmp_path,
                                                                              token_cache_dir):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path)
    model, tokenizer = load_causal_lm(spec)
    model = apply_method(model, spec)
    batch = sft.pad_batch(sft.prepare_data(spec, tokenizer, Reporter())[0][:6], tokenizer.pad_token_id)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss

    before = loss()
    sft.store_frozen_linears_in_bf16(model)
    stored = {p.dtype for n, p in model.named_parameters() if "base_layer" in n}
    assert stored == {torch.bfloat16} and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert loss() == before
