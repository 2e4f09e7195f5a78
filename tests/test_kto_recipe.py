"""The KTO recipe end to end on the tiny llama, plus its data handling and metrics."""

import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.support import preference as support
from tests.support.model_fixtures import number_word, write_jsonl
from tests.support.preference import fresh_process_logps, prompt_turns
from tests.support.resume import StopAfter, assert_resumed, assert_same_losses, baseline, interrupt_and_resume
from worker import forgetting
from worker.checkpoints import BASELINE
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.preflight import preflight_examples
from worker.recipes import kto
from worker.spec import SpecError, TrainChoices

pytestmark = pytest.mark.learning

GENERAL_KEYS = {"forgetting", "general_kl", "general_perplexity", "general_kl_coverage"}
"""The forgetting meter's values in every evaluation (worker.forgetting)."""


def feedback_rows(count: int = 64) -> list[dict[str, str]]:
    """Unpaired feedback the tiny llama picks up in a few steps: "seven!" is desirable, "seven?"
    is not, one row per word, the two kinds alternating. (A short system prompt keeps the rows
    short: without one the template adds a long default.)"""
    rows = []
    for n, word in enumerate(map(number_word, range(count))):
        desirable = n % 2 == 0
        rows.append(
            {
                "system": "Be brief.",
                "prompt": f"Say {word}.",
                "completion": f"{word}!" if desirable else f"{word}?",
                "label": "true" if desirable else "false",
            }
        )
    return rows


make_spec = partial(support.make_spec, "kto")
train = partial(support.train, kto.run)


@pytest.fixture(scope="module")
def kto_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto-data") / "kto.jsonl", feedback_rows())


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto-small") / "kto.jsonl", feedback_rows(16))


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, kto_jsonl, tmp_path_factory):
    return train(make_spec(tiny_llama_dir, kto_jsonl, tmp_path_factory.mktemp("kto-lora"), job_id=7))


def test_lora_kto_raises_the_sign_accuracy_clearly_above_chance(lora_run):
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    assert lora_run["result"]["primary_metric"] == "sign_accuracy"
    # At step 0 the model is its own reference: every reward is 0, counted as half right (chance).
    assert before.keys() == {"sign_accuracy", "reward_margin", "eval_loss"} | GENERAL_KEYS
    assert (before["sign_accuracy"], before["reward_margin"], before["eval_loss"]) == (0.5, 0.0, 0.5)
    assert after["sign_accuracy"] >= 0.9, after
    assert after["reward_margin"] > 0.5, after
    assert after["eval_loss"] < before["eval_loss"] - 0.1, after
    assert lora_run["result"]["steps"] == 8


def test_the_training_loss_falls_from_where_the_reference_starts(lora_run):
    losses = [event["loss"] for event in lora_run["events"] if event["kind"] == "metric"]
    # The first step starts from the reference: KTO's loss is 1 - σ(0) for every row (the weights
    # that balance the two kinds move it a little when the training rows are not half and half).
    assert losses[0] == pytest.approx(0.5, abs=0.05)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert lora_run["result"]["train_loss"] == losses[-1]


def test_it_reports_states_params_baseline_metrics_and_evals_in_order(lora_run):
    metrics = support.assert_reported_in_order(lora_run)
    assert {"loss", "total_steps", "epoch", "learning_rate", "kl"} <= set(metrics[0])
    assert any("reward_margin" in event for event in metrics)
    log = next(event["message"] for event in lora_run["events"] if event["kind"] == "log")
    counts = re.fullmatch(r"48 training rows \((\d+) desirable, (\d+) undesirable\), 16 validation rows\.", log)
    assert counts and int(counts[1]) + int(counts[2]) == 48, log


def test_every_evaluation_measures_forgetting_against_the_reference_model(lora_run):
    held = support.evals(lora_run["events"])
    assert all(set(event) >= GENERAL_KEYS and event["forgetting"] == event["general_kl"] for event in held)
    # At step 0 the adapters add nothing yet: the model is the base it is compared with.
    assert held[0]["forgetting"] == pytest.approx(0, abs=1e-6)
    assert all(event["forgetting"] > 0 and event["general_perplexity"] > 1 for event in held[1:]), held
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    assert before["forgetting"] == held[0]["forgetting"] and after["forgetting"] == held[-1]["forgetting"]
    assert after["general_perplexity"] != pytest.approx(before["general_perplexity"], rel=1e-4)


def test_the_final_eval_carries_the_general_answers_of_the_reference_and_the_tuned_model(lora_run):
    answers = support.evals(lora_run["events"])[-1]["general_answers"]
    assert answers == lora_run["result"]["general_answers"]
    assert [answer["prompt"] for answer in answers] == forgetting.general_prompts()
    assert all(set(answer) == {"prompt", "before", "after"} for answer in answers)
    assert not any("general_answers" in event for event in support.evals(lora_run["events"])[:-1])


def test_the_final_eval_carries_replies_before_and_after_to_desirable_prompts(lora_run):
    samples = support.assert_samples_before_and_after(lora_run)
    # Desirable rows come first: their completion is a reference answer.
    assert all(sample["instruction"].startswith("Say ") and sample["reference"].endswith("!") for sample in samples)


def test_the_artifact_is_an_adapter_with_tokenizer_spec_and_a_before_after_card(lora_run):
    card = support.adapter_card(lora_run)
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    assert f"| sign_accuracy (held out) | {before['sign_accuracy']:.4f} → {after['sign_accuracy']:.4f} |" in card
    assert "preference tuning (KTO" in card


def test_the_adapter_scores_the_held_out_rows_the_same_in_a_fresh_process(lora_run):
    predictions = json.loads((Path(lora_run["spec"].output_dir) / "eval_predictions.json").read_text())
    assert len(predictions) == 16 and sum(row["sign_right"] for row in predictions) >= 14
    assert {row["label"] for row in predictions} == {"true", "false"}
    scores = fresh_process_logps(lora_run, [(prompt_turns(row), row["completion"]) for row in predictions])
    for row, logp in zip(predictions, scores, strict=True):
        assert logp == pytest.approx(row["logp"], abs=1e-3)
        assert row["reward"] == pytest.approx(0.1 * (row["logp"] - row["reference_logp"]))
        assert row["sign_right"] == (row["reward"] > 0 if row["desirable"] else row["reward"] < 0)


def test_full_fine_tune_trains_against_a_frozen_copy_and_exports_the_model(tiny_llama_dir, kto_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, kto_jsonl, tmp_path / "out", method="full", learning_rate=5e-3, max_steps=6)
    run = train(spec)
    after = run["result"]["metrics_after"]
    # Rewards move only if the reference stayed where the policy started.
    assert after["reward_margin"] > 0.5 and after["sign_accuracy"] >= 0.9, after
    # So does forgetting, measured against that frozen copy.
    assert run["result"]["metrics_before"]["forgetting"] == pytest.approx(0, abs=1e-6)
    assert after["forgetting"] > 0 and len(run["result"]["general_answers"]) == len(forgetting.general_prompts())
    support.assert_full_model_artifact(run)


def test_a_stop_request_ends_training_and_raises_cancelled(tiny_llama_dir, small_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", validation_fraction=0.0)
    support.assert_a_stop_request_cancels(kto.run, spec)


def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_never_stopped(tiny_llama_dir, small_jsonl, tmp_path):
    settings = dict(max_steps=6, batch_size=4, checkpoint_every=3, eval_every=3)
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "resumed", **settings)
    first, second, result = interrupt_and_resume(kto.run, spec, stop_after=4)
    assert_resumed(first, second, checkpoint=3, total=6)
    uninterrupted = train(make_spec(tiny_llama_dir, small_jsonl, tmp_path / "once", **settings))
    assert_same_losses(second, uninterrupted["events"], after=3)
    # The rewards are measured against the reference scores kept from the first attempt, forgetting
    # against the same reference model.
    assert result["metrics_after"].keys() >= GENERAL_KEYS
    assert result["metrics_after"] == pytest.approx(uninterrupted["result"]["metrics_after"], rel=1e-4)
    assert result["metrics_before"] == baseline(first)
    assert result["general_answers"] == uninterrupted["result"]["general_answers"]


def test_a_baseline_kept_before_the_forgetting_meter_resumes_and_measures_from_then_on(
    tiny_llama_dir, small_jsonl, tmp_path
):
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", max_steps=3, batch_size=4, checkpoint_every=1)
    with pytest.raises(Cancelled):
        kto.run(spec, StopAfter(2))
    kept = Path(spec.output_dir) / BASELINE
    metrics, replies, scores = json.loads(kept.read_text())
    kept.write_text(json.dumps([{key: metrics[key] for key in metrics.keys() - GENERAL_KEYS}, replies, scores]))
    second = Reporter()
    result = kto.run(spec, second)
    assert any(event.get("message", "").startswith("Resuming from the checkpoint") for event in second.events)
    # No step-0 forgetting to show, but the reference model is still there to measure against.
    assert not GENERAL_KEYS & set(result["metrics_before"]) and result["metrics_after"]["forgetting"] > 0
    assert "Perplexity on general text" in (Path(result["artifact_dir"]) / "README.md").read_text()


def test_an_uploaded_validation_file_is_the_held_out_set(tiny_llama_dir, tmp_path):
    rows = feedback_rows(24)
    data, validation = write_jsonl(tmp_path / "train.jsonl", rows[:20]), write_jsonl(tmp_path / "val.jsonl", rows[20:])
    spec = make_spec(tiny_llama_dir, data, tmp_path / "out", max_steps=1, validation_path=str(validation))
    run = train(spec)  # validation_fraction 0.25 is ignored: every dataset row trains
    log = "20 training rows (10 desirable, 10 undesirable), 4 validation rows."
    assert any(event.get("message") == log for event in run["events"])
    predictions = json.loads((tmp_path / "out" / "eval_predictions.json").read_text())
    assert [row["prompt"] for row in predictions] == [row["prompt"] for row in rows[20:]]


def test_it_refuses_a_label_that_says_neither_kind_naming_the_line_and_the_value(tiny_llama_dir, tmp_path):
    rows = feedback_rows(4)
    rows[2]["label"] = "maybe"
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError, match="Line 3 of the dataset has the label 'maybe', which says neither"):
        kto.run(make_spec(tiny_llama_dir, data, tmp_path / "out"), Reporter())


def test_a_malformed_validation_file_is_named_as_such(tiny_llama_dir, small_jsonl, tmp_path):
    validation = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "completion": "c", "label": "perhaps"}])
    spec = make_spec(tiny_llama_dir, small_jsonl, tmp_path / "out", validation_path=str(validation))
    with pytest.raises(UserError, match="In the validation file: Line 1 .* 'perhaps'"):
        kto.run(spec, Reporter())


def test_it_refuses_training_rows_of_one_kind(tiny_llama_dir, tmp_path):
    rows = [row for row in feedback_rows(16) if row["label"] == "true"]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError, match="Every training row is labelled desirable. KTO learns from both kinds"):
        kto.run(make_spec(tiny_llama_dir, data, tmp_path / "out"), Reporter())


def test_it_refuses_rows_without_a_label(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Say one.", "completion": "one!"}])
    with pytest.raises(
        UserError, match=r"Line 1 of the dataset needs text fields prompt \(or prompt_messages\), completion and label"
    ):
        kto.run(make_spec(tiny_llama_dir, data, tmp_path / "out"), Reporter())


def test_it_refuses_an_encoder_base_in_words_about_preference_tuning(tiny_bert_dir, small_jsonl, tmp_path):
    with pytest.raises(UserError, match="cannot do preference tuning: it is not a text-generating"):
        kto.run(make_spec(tiny_bert_dir, small_jsonl, tmp_path / "out"), Reporter())


def test_a_batch_of_one_row_is_refused_on_the_batch_size_field():
    with pytest.raises(SpecError) as refused:
        TrainChoices(base_model="smollm2-135m-instruct", task="kto", batch_size=1)
    assert refused.value.field == "batch_size" and "at least 2 rows" in refused.value.message
    TrainChoices(base_model="smollm2-135m-instruct", task="dpo", batch_size=1)  # only KTO pairs rows


def test_rows_split_into_prompt_and_completion_at_the_assistant_turn(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"system": "Be brief.", "prompt": "Say three.", "completion": "three!", "label": "true"}
    ids = kto.tokenize_row(row, tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say three."}]
    assert ids["prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids["completion"]) == "three!<|im_end|>\n"


def test_a_multi_turn_prompt_is_rendered_as_its_turns(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say one."},
        {"role": "assistant", "content": "one!"},
        {"role": "user", "content": "Say two."},
    ]
    ids = kto.tokenize_row({"prompt_messages": turns, "completion": "two!", "label": "yes"}, tokenizer)
    assert ids["prompt"] == tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids["completion"]) == "two!<|im_end|>\n"


def test_the_preflight_marks_the_completion_tokens_as_trained(tiny_llama_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", feedback_rows(2))
    first, _ = preflight_examples(rows, "kto", tiny_llama_dir, 64)
    (sequence,) = first["sequences"]
    trained = "".join(span["text"] for span in sequence["spans"] if span["loss"])
    assert trained == "zero!<|im_end|>\n" and not sequence["skipped"]


def test_the_rarer_kind_weighs_more_so_both_kinds_weigh_the_same():
    rows = [{"desirable": True}] * 3 + [{"desirable": False}] * 9
    assert kto.balancing_weights(rows) == {"desirable_weight": 3.0, "undesirable_weight": 1.0}
    assert kto.balancing_weights(rows[:6]) == {"desirable_weight": 1.0, "undesirable_weight": 1.0}


def test_the_sign_accuracy_counts_a_zero_reward_as_half_right():
    # Rows: desirable, its reward up; desirable, no change; undesirable, its reward up (wrong);
    # undesirable, its reward down. Column 1 holds the mismatched pairs of the KL estimate.
    reference = torch.tensor([[[-4.0, 2], [-6.0, 2]]] * 4)
    scores = reference.clone()
    scores[:, 0, 0] += torch.tensor([2.0, 0.0, 1.0, -3.0])
    scores[:, 1, 0] += torch.tensor([1.0, 1.0, 0.0, 0.0])  # the KL estimate: 0.5
    desirable = torch.tensor([True, True, False, False])
    metrics = kto.kto_metrics(scores, reference, desirable, beta=0.5)
    assert metrics["sign_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert metrics["reward_margin"] == pytest.approx((1.0 + 0.0) / 2 - (0.5 - 1.5) / 2)
    logratios, kl = torch.tensor([2.0, 0.0, 1.0, -3.0]), 0.5
    losses = [1 - torch.sigmoid(0.5 * (x - kl)) for x in logratios[:2]] + [
        1 - torch.sigmoid(0.5 * (kl - x)) for x in logratios[2:]
    ]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item())
    assert kto.kto_metrics(reference, reference, desirable, beta=0.5) == {
        "sign_accuracy": 0.5,
        "reward_margin": 0.0,
        "eval_loss": 0.5,
    }
