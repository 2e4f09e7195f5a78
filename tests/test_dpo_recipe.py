"""The DPO recipe end to end on the tiny llama, plus its data handling and metrics."""

import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.support import preference as support
from tests.support.model_fixtures import number_word, write_jsonl
from tests.support.preference import fresh_process_logps, prompt_turns
from tests.support.resume import assert_resumed, assert_same_losses, baseline, interrupt_and_resume
from worker import preference
from worker.errors import UserError
from worker.events import Reporter
from worker.recipes import dpo


def preference_rows(count: int = 64) -> list[dict[str, str]]:
    """A preference the tiny llama picks up in a few steps: "seven!" over "seven?". The untouched
    model's choice between the two depends on the word, so it starts near chance. (A short system
    prompt keeps the rows short: without one the template adds a long default.)"""
    return [
        {"system": "Be brief.", "prompt": f"Say {word}.", "chosen": f"{word}!", "rejected": f"{word}?"}
        for word in map(number_word, range(count))
    ]


make_spec = partial(support.make_spec, "dpo")
train = partial(support.train, dpo.run)


@pytest.fixture(scope="module")
def dpo_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "dpo.jsonl", preference_rows())


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-small") / "dpo.jsonl", preference_rows(16))


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, dpo_jsonl, tmp_path_factory):
    """Pure DPO (no likelihood term), whose losses and rewards have textbook values to check."""
    out = tmp_path_factory.mktemp("dpo-lora")
    return train(make_spec(tiny_llama_dir, dpo_jsonl, out, job_id=7, dpo_sft_weight=0))


@pytest.fixture(scope="module")
def rpo_run(tiny_llama_dir, dpo_jsonl, tmp_path_factory):
    """The product's default: DPO plus a likelihood term on the chosen reply."""
    return train(make_spec(tiny_llama_dir, dpo_jsonl, tmp_path_factory.mktemp("dpo-rpo")))


def test_lora_dpo_learns_the_preference_the_base_does_not_have(lora_run):
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    assert lora_run["result"]["primary_metric"] == "preference_accuracy"
    assert before["preference_accuracy"] <= 0.7, before
    assert after["preference_accuracy"] >= 0.9, after
    # At step 0 the model is its own reference: no reward, and DPO's loss is log 2.
    assert before["reward_accuracy"] == 0 and before["reward_margin"] == 0
    assert before["eval_loss"] == pytest.approx(math.log(2))
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.5
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    assert lora_run["result"]["steps"] == 8


def mean_chosen_logp(run: dict) -> float:
    pairs = json.loads((Path(run["spec"].output_dir) / "eval_predictions.json").read_text())
    return sum(pair["chosen_logp"] for pair in pairs) / len(pairs)


@pytest.mark.learning  # a second DPO run of its own (62 s of make test's time)
def test_the_chosen_reply_term_makes_the_model_write_the_chosen_replies(lora_run, rpo_run):
    assert rpo_run["result"]["metrics_after"]["preference_accuracy"] >= 0.9
    # Pure DPO only widens the gap between the answers; with the likelihood term the chosen
    # replies themselves become far more likely (what the user then sees in generations).
    assert mean_chosen_logp(rpo_run) > mean_chosen_logp(lora_run) + 2.0, (
        mean_chosen_logp(rpo_run),
        mean_chosen_logp(lora_run),
    )


def test_it_reports_states_params_baseline_metrics_and_evals_in_order(lora_run):
    metrics = support.assert_reported_in_order(lora_run)
    assert {"loss", "total_steps", "epoch", "learning_rate", "reward_accuracy", "reward_margin"} <= set(metrics[0])
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the first step starts from the reference
    assert lora_run["result"]["train_loss"] == metrics[-1]["loss"]
    log = next(event["message"] for event in lora_run["events"] if event["kind"] == "log")
    assert log == "48 training pairs, 16 validation pairs."


def test_the_final_eval_carries_replies_before_and_after(lora_run):
    samples = support.assert_samples_before_and_after(lora_run)
    assert all(sample["instruction"].startswith("Say ") and sample["reference"].endswith("!") for sample in samples)


def test_the_artifact_is_an_adapter_with_tokenizer_spec_and_a_before_after_card(lora_run):
    card = support.adapter_card(lora_run)
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    row = (
        f"| preference_accuracy (held out) | {before['preference_accuracy']:.4f} → {after['preference_accuracy']:.4f} |"
    )
    assert row in card and "preference tuning (DPO" in card


def test_the_adapter_scores_the_held_out_pairs_the_same_in_a_fresh_process(lora_run):
    predictions = json.loads((Path(lora_run["spec"].output_dir) / "eval_predictions.json").read_text())
    assert len(predictions) == 16 and sum(p["prefers_chosen"] for p in predictions) >= 15
    answers = [(prompt_turns(pair), pair[answer]) for pair in predictions for answer in ("chosen", "rejected")]
    scores = fresh_process_logps(lora_run, answers)
    for pair, chosen_logp, rejected_logp in zip(predictions, scores[::2], scores[1::2], strict=True):
        assert chosen_logp == pytest.approx(pair["chosen_logp"], abs=1e-3)
        assert rejected_logp == pytest.approx(pair["rejected_logp"], abs=1e-3)
        assert pair["reward_chosen"] == pytest.approx(0.1 * (pair["chosen_logp"] - pair["reference_chosen_logp"]))


def test_full_fine_tune_trains_against_a_frozen_copy_and_exports_the_model(tiny_llama_dir, small_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", method="full", learning_rate=5e-3, max_steps=3)
    run = train(spec)
    after = run["result"]["metrics_after"]
    # Rewards move only if the reference stayed where the policy started.
    assert after["reward_margin"] > 0 and after["reward_accuracy"] >= 0.9, after
    support.assert_full_model_artifact(run)


def test_a_stop_request_ends_training_and_raises_cancelled(tiny_llama_dir, small_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", validation_fraction=0.0)
    support.assert_a_stop_request_cancels(dpo.run, spec)


@pytest.mark.long  # 130 s; the resume of the other recipes (sft, classify, embed) stays in make test
@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_never_stopped(
    method, tiny_llama_dir, small_jsonl, tmp_path
):
    settings = dict(method=method, max_steps=6, batch_size=4, checkpoint_every=3, eval_every=3, dpo_sft_weight=0)
    if method == "full":
        settings["learning_rate"] = 5e-3
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "resumed", **settings)
    first, second, result = interrupt_and_resume(dpo.run, spec, stop_after=4)
    assert_resumed(first, second, checkpoint=3, total=6)
    uninterrupted = train(make_spec(tiny_llama_dir, small_jsonl, tmp_path / "once", **settings))
    assert_same_losses(second, uninterrupted["events"], after=3)
    # The rewards are measured against the reference scores kept from the first attempt.
    assert result["metrics_after"] == pytest.approx(uninterrupted["result"]["metrics_after"], rel=1e-4)
    assert result["metrics_before"] == baseline(first)


def test_an_uploaded_validation_file_is_the_held_out_set(tiny_llama_dir, tmp_path):
    rows = preference_rows(24)
    data, validation = write_jsonl(tmp_path / "train.jsonl", rows[:20]), write_jsonl(tmp_path / "val.jsonl", rows[20:])
    spec = make_spec(tiny_llama_dir, data, tmp_path / "out", max_steps=1, validation_path=str(validation))
    run = train(spec)  # validation_fraction 0.25 is ignored: every dataset pair trains
    assert any(e.get("message", "").startswith("20 training pairs, 4 validation pairs") for e in run["events"])
    predictions = json.loads((tmp_path / "out" / "eval_predictions.json").read_text())
    assert [p["prompt"] for p in predictions] == [row["prompt"] for row in rows[20:]]


def test_a_malformed_validation_file_is_named_as_such(tiny_llama_dir, small_jsonl, tmp_path):
    validation = tmp_path / "val.jsonl"
    validation.write_text('{"prompt": "p", "chosen": "c"}\n')
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", validation_path=str(validation))
    with pytest.raises(
        UserError,
        match=r"In the validation file: Line 1 .* needs text fields prompt \(or prompt_messages\), chosen and rejected",
    ):
        dpo.run(spec, Reporter())


def test_it_refuses_a_base_without_a_chat_template(tiny_llama_dir, small_jsonl, tmp_path):
    plain = shutil.copytree(tiny_llama_dir, tmp_path / "plain-llama")
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no chat template"):
        dpo.run(make_spec(plain, small_jsonl, tmp_path / "out"), Reporter())


def test_it_refuses_an_encoder_as_base(tiny_bert_dir, small_jsonl, tmp_path):
    with pytest.raises(UserError, match="not a text-generating"):
        dpo.run(make_spec(tiny_bert_dir, small_jsonl, tmp_path / "out"), Reporter())


def test_it_refuses_rows_without_a_rejected_answer(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Say one.", "chosen": "one!"}])
    with pytest.raises(
        UserError, match=r"Line 1 of the dataset needs text fields prompt \(or prompt_messages\), chosen and rejected"
    ):
        dpo.run(make_spec(tiny_llama_dir, data, tmp_path / "out"), Reporter())


def test_pairs_split_into_prompt_and_answers_at_the_assistant_turn(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"system": "Be brief.", "prompt": "Say three.", "chosen": "three!", "rejected": "three?"}
    ids = dpo.tokenize_pair(row, tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say three."}]
    assert ids["prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids["chosen"]) == "three!<|im_end|>\n"
    assert tokenizer.decode(ids["rejected"]) == "three?<|im_end|>\n"
    without_system = dpo.tokenize_pair({key: row[key] for key in dpo.FIELDS}, tokenizer)
    assert tokenizer.decode(without_system["prompt"]).startswith("<|im_start|>system\nYou are a helpful")


def test_pairs_whose_prompt_fills_the_length_are_skipped_and_reported(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = preference_rows(4) + [{"prompt": "word " * 100, "chosen": "a", "rejected": "b"}]
    reporter = Reporter()
    kept = preference.tokenize(dpo.PAIRS, rows, tokenizer, 64, reporter, "training")
    assert [row for row, _ in kept] == rows[:4]
    assert reporter.events[-1]["message"].startswith("Skipped 1 of 5 training pairs")


def test_preference_accuracy_compares_the_mean_log_probability_per_token():
    # Pair 1: chosen is 2 tokens at -1 each, rejected 10 tokens at -0.5 each: a lower sum, but the
    # rejected answer is more probable per token, so the model does not prefer the chosen one.
    # Pair 2: chosen -0.2 per token against -1 per token.
    scores = torch.tensor([[[-2.0, 2], [-5.0, 10]], [[-0.6, 3], [-3.0, 3]]])
    reference = torch.tensor([[[-3.0, 2], [-5.0, 10]], [[-0.6, 3], [-2.0, 3]]])
    metrics = dpo.preference_metrics(scores, reference, beta=0.5)
    assert metrics["preference_accuracy"] == 0.5
    margins = torch.tensor([0.5 * 1.0 - 0.0, 0.0 - 0.5 * -1.0])
    assert metrics["reward_accuracy"] == 1.0
    assert metrics["reward_margin"] == pytest.approx(margins.mean().item())
    assert metrics["eval_loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margins).mean().item())


def test_it_refuses_an_encoder_base_in_words_about_preference_tuning(tiny_bert_dir, small_jsonl, tmp_path):
    with pytest.raises(UserError, match="cannot do preference tuning: it is not a text-generating"):
        dpo.run(make_spec(tiny_bert_dir, small_jsonl, tmp_path / "out"), Reporter())
