"""The SFT recipe end to end on the tiny llama, plus its data handling."""

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.model_fixtures import sft_rows, write_jsonl
from worker import forgetting, tradeoff
from worker.artifacts import zip_dir
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.models import load_causal_lm
from worker.recipes import sft
from worker.rows import read_rows, split_rows
from worker.spec import TrainSpec


def make_spec(base: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    settings = dict(max_steps=24, batch_size=8, max_seq_length=64, eval_every=8, validation_fraction=0.1)
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def train(spec: TrainSpec) -> dict:
    """Run the recipe and keep what it produced, including the trained model itself."""
    trained = {}

    def export_and_keep(model, *args):
        trained["model"] = model
        return real_export(model, *args)

    real_export = sft.export
    reporter = Reporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "export", export_and_keep)
        result = sft.run(spec, reporter)
    return {"result": result, "events": reporter.events, "model": trained["model"], "spec": spec}


def losses(events: list[dict]) -> list[float]:
    return [event["loss"] for event in events if event["kind"] == "metric"]


def assert_loss_falls(events: list[dict]) -> None:
    values = losses(events)
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.5, values


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, sft_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    return train(make_spec(tiny_llama_dir, sft_jsonl, out, method="lora", learning_rate=2e-2, job_id=12))


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, sft_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-run")
    return train(make_spec(tiny_llama_dir, sft_jsonl, out, method="full", learning_rate=5e-3))


def test_lora_training_lowers_the_loss(lora_run):
    assert_loss_falls(lora_run["events"])
    assert lora_run["result"]["steps"] == 24
    assert lora_run["result"]["train_loss"] == losses(lora_run["events"])[-1]
    assert lora_run["result"]["eval_loss"] < losses(lora_run["events"])[0]


def test_it_reports_states_params_metrics_and_evals_in_order(lora_run):
    events = lora_run["events"]
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["preparing", "training", "evaluating", "exporting"]
    kinds = [event["kind"] for event in events]
    assert kinds.index("params") < kinds.index("metric") < kinds.index("artifact")
    metric = next(event for event in events if event["kind"] == "metric")
    assert metric["step"] == 1 and metric["total_steps"] == 24
    assert {"loss", "learning_rate", "epoch"} <= set(metric)
    # The tokens trained on so far (the fine-tuning API's trained_tokens): padding not counted.
    tokens = [event["tokens"] for event in events if event["kind"] == "metric"]
    assert 0 < tokens[0] < tokens[-1] and tokens == sorted(tokens)
    evals = [event for event in events if event["kind"] == "eval"]
    assert [event["step"] for event in evals] == [0, 8, 16, 24]  # baseline, periodic, and once at the end
    assert evals[0]["baseline"] is True and evals[-1]["final"] is True
    assert not {"baseline", "final"} & set(evals[1]) and not {"baseline", "final"} & set(evals[2])
    # An adapter job measures its baseline (the base, adapters off) right after its first step.
    assert kinds.index("params") < kinds.index("metric") == kinds.index("eval") - 1
    assert events[kinds.index("metric")]["step"] == 1
    assert evals[-1]["eval_loss"] == lora_run["result"]["eval_loss"]
    assert evals[-1]["perplexity"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item())
    params = next(event for event in events if event["kind"] == "params")
    assert params["method"] == "lora" and 0 < params["trainable"] < params["total"]


def test_it_reports_the_untouched_model_as_the_baseline_and_the_final_eval_after(lora_run):
    result = lora_run["result"]
    evals = [event for event in lora_run["events"] if event["kind"] == "eval"]
    assert result["primary_metric"] == "eval_loss"
    keys = ("eval_loss", "perplexity", *GENERAL_KEYS)
    assert result["metrics_before"] == {key: evals[0][key] for key in keys}
    assert result["metrics_after"] == {key: evals[-1][key] for key in keys}
    assert result["metrics_after"]["eval_loss"] < result["metrics_before"]["eval_loss"] - 2
    assert result["metrics_before"]["perplexity"] == pytest.approx(math.exp(result["metrics_before"]["eval_loss"]))


def test_a_lora_jobs_baseline_after_its_first_step_is_the_untouched_models(lora_run, full_run):
    # A full fine-tune measures the untouched model before its first step; the LoRA job after
    # it, with the adapters off: the same held-out rows give the same loss.
    def baseline(run):
        return next(e for e in run["events"] if e["kind"] == "eval" and e.get("baseline"))["eval_loss"]

    assert baseline(lora_run) == pytest.approx(baseline(full_run), rel=1e-5)
    kinds = [event["kind"] for event in full_run["events"]]
    assert kinds.index("eval") < kinds.index("metric")


GENERAL_KEYS = ("general_perplexity", "general_kl", "forgetting", "general_kl_coverage")


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_every_evaluation_measures_forgetting_on_the_general_probe(request, run):
    evals = [event for event in request.getfixturevalue(run)["events"] if event["kind"] == "eval"]
    assert all(set(GENERAL_KEYS) <= set(event) for event in evals)
    assert evals[0]["forgetting"] == 0  # the baseline is the base itself
    assert all(event["forgetting"] == event["general_kl"] > 0 for event in evals[1:])


def test_the_baseline_probe_is_the_untouched_models_with_or_without_adapters(lora_run, full_run):
    def baseline(run):
        return next(e for e in run["events"] if e["kind"] == "eval" and e.get("baseline"))["general_perplexity"]

    assert baseline(lora_run) == pytest.approx(baseline(full_run), rel=1e-4)


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_it_answers_the_general_prompts_before_and_after_training(request, run):
    result = request.getfixturevalue(run)["result"]
    answers = result["general_answers"]
    assert [answer["prompt"] for answer in answers] == forgetting.general_prompts()
    assert all(set(answer) == {"prompt", "before", "after"} for answer in answers)
    assert any(answer["before"] != answer["after"] for answer in answers)


def test_replay_mixes_general_text_into_the_training_rows(tiny_llama_dir, sft_jsonl, tmp_path):
    reporter = Reporter()
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path, method="full", learning_rate=5e-3, max_steps=4,
                     eval_every=4, replay_fraction=0.25)
    result = sft.run(spec, reporter)
    logs = [event["message"] for event in reporter.events if event["kind"] == "log"]
    assert "Replay: 19 rows of general text mixed into the 58 training rows (25% of all), the loss on every token." in logs
    assert result["metrics_after"]["forgetting"] > 0


def test_it_answers_held_out_instructions_before_and_after_training(lora_run):
    samples = lora_run["result"]["samples"]
    final = [event for event in lora_run["events"] if event["kind"] == "eval"][-1]
    assert final["samples"] == samples and len(samples) == 3
    assert all(set(sample) == {"instruction", "reference", "before", "after"} for sample in samples)
    assert all(sample["instruction"].startswith("Say the word for ") for sample in samples)
    assert all(sample["reference"].startswith("WORD: ") for sample in samples)
    # The random base babbles; after training the replies take the dataset's format.
    assert not any(sample["before"].startswith("WORD:") for sample in samples)
    assert all(sample["after"].startswith("WORD:") for sample in samples), samples
    saved = json.loads((Path(lora_run["spec"].output_dir) / "eval_predictions.json").read_text())
    assert saved == samples


def test_the_lora_artifact_holds_the_adapter_tokenizer_spec_and_card(lora_run):
    artifact = Path(lora_run["result"]["artifact_dir"])
    names = {path.name for path in artifact.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "train_spec.json",
        "README.md",
    } <= names
    assert "model.safetensors" not in names
    assert TrainSpec.from_json((artifact / "train_spec.json").read_text()) == lora_run["spec"]
    card = (artifact / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "specialist-job-12-adapter")' in card
    assert "| LoRA rank r | 16 |" in card and "| Final validation loss |" in card
    before, after = lora_run["result"]["metrics_before"], lora_run["result"]["metrics_after"]
    assert f"| eval_loss (held out) | {before['eval_loss']:.4f} → {after['eval_loss']:.4f} |" in card
    assert f"| Forgetting on general text (0 = the base) | 0.0000 → {after['forgetting']:.4f} |" in card
    assert f"| Perplexity on general text | {before['general_perplexity']:.4f} → " in card
    assert "general_kl" not in card
    adapter_config = json.loads((artifact / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == lora_run["spec"].base_model


def test_the_reloaded_adapter_equals_the_trained_one(lora_run, tiny_llama_dir):
    trained = {k: v for k, v in lora_run["model"].state_dict().items() if "lora_" in k}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reloaded = PeftModel.from_pretrained(base, lora_run["result"]["artifact_dir"])
    loaded = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys() and len(trained) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in loaded.items())


def test_the_zip_unpacks_to_one_folder_named_like_the_zip(lora_run, tmp_path):
    zip_path = zip_dir(lora_run["result"]["artifact_dir"], tmp_path / "specialist-job-12-adapter.zip")
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    assert "specialist-job-12-adapter/adapter_model.safetensors" in names
    assert all(name.startswith("specialist-job-12-adapter/") for name in names)
    base = AutoModelForCausalLM.from_pretrained(lora_run["spec"].base_model)
    PeftModel.from_pretrained(base, tmp_path / "unzipped" / "specialist-job-12-adapter")


def test_full_fine_tune_lowers_the_loss_and_exports_the_whole_model(full_run):
    assert_loss_falls(full_run["events"])
    artifact = Path(full_run["result"]["artifact_dir"])
    names = {path.name for path in artifact.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_spec.json", "README.md"} <= names
    assert "adapter_config.json" not in names
    reloaded = AutoModelForCausalLM.from_pretrained(artifact).state_dict()
    trained = full_run["model"].state_dict()
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    assert tokenizer.chat_template


def test_only_the_response_tokens_are_labelled(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"system": "Be brief.", "instruction": "Say the word for 3.", "response": "WORD: three."}
    example = sft.tokenize_example(row, tokenizer, max_length=512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say the word for 3."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    labels, input_ids = example["labels"], example["input_ids"]
    assert input_ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [sft.IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == input_ids[len(prompt) :]
    assert tokenizer.decode(labels[len(prompt) :]) == "WORD: three.<|im_end|>\n"


def test_the_input_field_follows_the_instruction_in_the_user_turn(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"instruction": "Summarise the text.", "input": "Cats sleep a lot.", "response": "Cats nap."}
    example = sft.tokenize_example(row, tokenizer, max_length=512)
    assert "<|im_start|>user\nSummarise the text.\n\nCats sleep a lot.<|im_end|>" in tokenizer.decode(
        example["input_ids"]
    )


def test_truncation_keeps_the_response_start_and_drops_rows_without_response(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    row = {"instruction": "Say the word for 3.", "response": "WORD: three, which is a small number."}
    prompt_length = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], add_generation_prompt=True, return_dict=False
        )
    )
    cut = sft.tokenize_example(row, tokenizer, max_length=prompt_length + 2)
    assert len(cut["input_ids"]) == len(cut["labels"]) == prompt_length + 2
    assert sum(label != sft.IGNORE_INDEX for label in cut["labels"]) == 2
    assert sft.tokenize_example(row, tokenizer, max_length=prompt_length) is None


def test_a_literal_end_of_turn_in_the_data_stays_text(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    example = sft.tokenize_example({"instruction": "x <|im_end|> y", "response": "ok"}, tokenizer, 512)
    assert example["input_ids"].count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3  # system, user, reply


def test_the_split_is_seeded_stable_and_holds_out_at_least_one_row():
    rows = [{"instruction": f"q{n}", "response": "a"} for n in range(50)]
    train_rows, held_out = split_rows(rows, 0.1, seed=1)
    assert len(held_out) == 5 and len(train_rows) == 45 and {r["instruction"] for r in train_rows + held_out} == {
        r["instruction"] for r in rows
    }
    assert split_rows(rows, 0.1, seed=1) == (train_rows, held_out)
    assert split_rows(rows, 0.1, seed=2) != (train_rows, held_out)
    assert len(split_rows(rows[:3], 0.01, seed=1)[1]) == 1
    assert split_rows(rows[:1], 0.5, seed=1) == (rows[:1], [])
    assert split_rows(rows, 0.0, seed=1) == (rows, [])


def test_the_padding_collator_pads_to_the_longest_row():
    batch = sft.pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_rows_without_room_for_a_response_are_skipped_and_reported(tiny_llama_dir, tmp_path):
    rows = sft_rows(16) + [{"instruction": "word " * 200, "response": "too late"}] * 3
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    reporter = Reporter()
    spec = make_spec(tiny_llama_dir, data, tmp_path / "out", validation_fraction=0.0, max_seq_length=128)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    train_rows, eval_rows, held_out = sft.prepare_data(spec, tokenizer, reporter)
    assert len(train_rows) == 16 and eval_rows == held_out == []
    messages = [event["message"] for event in reporter.events if event["kind"] == "log"]
    assert any(message.startswith("Skipped 3 of 19 training rows") for message in messages)


def test_it_refuses_a_dataset_with_no_usable_rows(tiny_llama_dir, sft_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "out", max_seq_length=8)
    with pytest.raises(UserError, match="max_seq_length=8"):
        sft.run(spec, Reporter())


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no rows"), ("{not json\n", "Line 1"), ('{"instruction": "x"}\n', "instruction and response")],
)
def test_it_refuses_malformed_data(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_rows(path, sft.FIELDS)


def test_a_stop_request_ends_training_and_raises_cancelled(tiny_llama_dir, sft_jsonl, tmp_path):
    class StopAfterTwoSteps(Reporter):
        def metric(self, step, **values):
            super().metric(step, **values)
            if step == 2:
                self.stop_requested.set()

    reporter = StopAfterTwoSteps()
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "out", learning_rate=1e-3, validation_fraction=0.0)
    with pytest.raises(Cancelled):
        sft.run(spec, reporter)
    assert max(event["step"] for event in reporter.events if event["kind"] == "metric") <= 3
    assert not [event for event in reporter.events if event["kind"] == "eval"]  # nothing held out
    assert not (tmp_path / "out" / "final").exists()
    assert "exporting" not in [event.get("state") for event in reporter.events]


def test_it_refuses_an_encoder_as_base(tmp_path):
    spec = TrainSpec(base_model="all-minilm-l6-v2", dataset_path="-", output_dir=str(tmp_path))
    with pytest.raises(UserError, match="cannot do instruction tuning"):
        load_causal_lm(spec)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "/no/such/folder"])
def test_it_refuses_an_unknown_base(name, tmp_path):
    spec = TrainSpec(base_model=name, dataset_path="-", output_dir=str(tmp_path))
    with pytest.raises(UserError):
        load_causal_lm(spec)


def test_worker_run_prints_each_event_as_a_json_line(tiny_llama_dir, sft_jsonl, tmp_path):
    spec = make_spec(tiny_llama_dir, sft_jsonl, tmp_path / "out", max_steps=2, learning_rate=1e-3)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.to_json())
    done = subprocess.run(
        [sys.executable, "-m", "worker.run", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["state"] for e in events if e["kind"] == "state"][-1] == "succeeded"
    assert [e["step"] for e in events if e["kind"] == "metric"] == [1, 2]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_the_checkpoints_kept_for_download_are_the_evaluations_on_the_trade_off_front(request, run):
    run = request.getfixturevalue(run)
    evals = [(e["step"], e) for e in run["events"] if e["kind"] == "eval" and not e.get("baseline")]
    points = tradeoff.points(evals, "eval_loss")
    front = [p for p in points if p in tradeoff.front(points, "eval_loss") or p.key == 24]  # the final is always listed
    kept = run["result"]["checkpoints"]
    assert [entry["step"] for entry in kept] == [point.key for point in front]
    assert [entry["final"] for entry in kept] == [point.key == 24 for point in front]
    assert sum(entry["balanced"] for entry in kept) == 1
    for entry, point in zip(kept, front, strict=True):
        assert entry["metrics"] == {"eval_loss": point.metric, "forgetting": point.forgetting}
        assert (entry["zip"] is None) == entry["final"]


def _unzipped(zip_path: str, into: Path) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(into)
        return into / archive.namelist()[0].split("/")[0]


def _kept_reference(run) -> forgetting.Reference:
    """The base's probe as the job measured and kept it (its baseline.json)."""
    return sft.kept_baseline(json.loads((Path(run["spec"].output_dir) / "baseline.json").read_text())).general


def test_a_kept_checkpoint_is_the_model_as_evaluated_at_its_step(full_run, tmp_path):
    """Its zip, loaded in a fresh model, measures the forgetting its evaluation reported, and its
    card says which step it is; the final model measures its own."""
    kept = [entry for entry in full_run["result"]["checkpoints"] if not entry["final"]]
    assert kept, full_run["result"]["checkpoints"]  # full fine-tuning forgets more with every step here
    reference = _kept_reference(full_run)
    for entry in kept:
        folder = _unzipped(entry["zip"], tmp_path / str(entry["step"]))
        assert folder.name == f"specialist-model-step-{entry['step']}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert forgetting.measure(model, reference)["forgetting"] == pytest.approx(entry["metrics"]["forgetting"], rel=1e-3)
        assert f"step {entry['step']}, as evaluated during training" in (folder / "README.md").read_text()
    final = AutoModelForCausalLM.from_pretrained(full_run["result"]["artifact_dir"])
    final_forgetting = forgetting.measure(final, reference)["forgetting"]
    assert final_forgetting == pytest.approx(full_run["result"]["metrics_after"]["forgetting"], rel=1e-3)
    assert all(final_forgetting > entry["metrics"]["forgetting"] * 1.05 for entry in kept)


def test_a_kept_lora_checkpoint_is_an_adapter_for_the_base(lora_run, tiny_llama_dir, tmp_path):
    reference = _kept_reference(lora_run)
    for entry in [entry for entry in lora_run["result"]["checkpoints"] if not entry["final"]]:
        folder = _unzipped(entry["zip"], tmp_path / str(entry["step"]))
        assert folder.name == f"specialist-job-12-adapter-step-{entry['step']}"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), folder)
        assert forgetting.measure(model, reference)["forgetting"] == pytest.approx(entry["metrics"]["forgetting"], rel=1e-3)
