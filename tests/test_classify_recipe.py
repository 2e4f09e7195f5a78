"""The classify recipe end to end (text and text-pair classification), plus its parts.

Tiny models learn a trivially learnable pattern (which group a word belongs to); the bundled
all-MiniLM-L6-v2 learns the sample intent data. Every artifact is loaded in a fresh Python
process with a transformers pipeline and must predict what eval_predictions.json says.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.model_fixtures import TINY_BERT, write_jsonl
from tests.support.resume import assert_resumed, assert_same_losses, baseline, interrupt_and_resume
from webapp.datasets.samples import classify as classify_sample
from webapp.datasets.samples import pair as pair_sample
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.models import load_sequence_classifier
from worker.recipes import classify
from worker.rows import stratified_split
from worker.sentence_models import ADAPTER_NOTE, ADAPTER_SUBDIR
from worker.spec import TrainSpec

GROUPS = {
    "animal": ["horse", "tiger", "zebra", "camel", "eagle", "whale", "mouse", "snake"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "melon"],
    "vehicle": ["truck", "bicycle", "train", "plane", "boat", "taxi", "tractor", "scooter"],
}


def group_rows(count: int = 180) -> list[dict[str, str]]:
    """Three words of one group; the label is the group."""
    rng = random.Random(0)
    labels = sorted(GROUPS)
    return [{"text": " ".join(rng.sample(GROUPS[labels[i % 3]], 3)), "label": labels[i % 3]} for i in range(count)]


def both_fruit_rows(count: int = 200) -> list[dict[str, str]]:
    """A word in each text; "supported" when both are fruits, else "unsupported" (about half)."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = (rng.choice(GROUPS["fruit"] if rng.random() < 0.7 else GROUPS["animal"]) for _ in "ab")
        both = a in GROUPS["fruit"] and b in GROUPS["fruit"]
        rows.append({"text_a": a, "text_b": b, "label": "supported" if both else "unsupported"})
    return rows


def make_spec(base: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    settings = dict(
        task="classify", max_steps=30, batch_size=16, eval_every=10, validation_fraction=0.2, max_seq_length=32
    )
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def train(spec: TrainSpec) -> dict:
    reporter = Reporter()
    result = classify.run(spec, reporter)
    return {"result": result, "events": reporter.events, "spec": spec}


def evals(run: dict) -> list[dict]:
    return [event for event in run["events"] if event["kind"] == "eval"]


def accuracies(run: dict) -> tuple[float, float]:
    return run["result"]["metrics_before"]["accuracy"], run["result"]["metrics_after"]["accuracy"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared machine the threads'
    spin-waiting makes every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("classify-data") / "groups.jsonl", group_rows())


@pytest.fixture(scope="module")
def full_run(tiny_bert_dir, group_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("full-run")
    # The held-out texts are never training texts (the split groups rows by input), so the tiny
    # models below train long enough to generalise to new word combinations, not to recall them.
    return train(make_spec(tiny_bert_dir, group_jsonl, out, method="full", learning_rate=2e-2, job_id=7, max_steps=40))


@pytest.fixture(scope="module")
def lora_run(wide_bert_dir, group_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    spec = make_spec(
        wide_bert_dir, group_jsonl, out, method="lora", lora_target_modules=["all-linear"], learning_rate=2e-2, job_id=8
    )
    return train(spec)


@pytest.fixture(scope="module")
def head_run(wide_bert_dir, group_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("head-run")
    return train(make_spec(wide_bert_dir, group_jsonl, out, method="head", learning_rate=1e-1, max_steps=50))


@pytest.fixture(scope="module")
def pair_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair-run")
    data = write_jsonl(out / "pairs.jsonl", both_fruit_rows())
    return train(make_spec(tiny_bert_dir, data, out, task="pair", method="full", learning_rate=2e-2, max_steps=40))


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, group_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-run")
    return train(make_spec(tiny_llama_dir, group_jsonl, out, method="lora", learning_rate=2e-2))


@pytest.fixture(scope="module")
def minilm_run(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-run")
    data = write_jsonl(out / "intents.jsonl", classify_sample.rows())
    spec = make_spec(
        minilm_dir,
        data,
        out,
        method="lora",
        lora_target_modules=["all-linear"],
        learning_rate=5e-3,
        max_steps=15,
        eval_every=5,
    )
    return train(spec)


@pytest.fixture(scope="module")
def minilm_pair_run(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-pair-run")
    data = write_jsonl(out / "claims.jsonl", pair_sample.rows())
    spec = make_spec(
        minilm_dir,
        data,
        out,
        task="pair",
        method="lora",
        lora_target_modules=["all-linear"],
        learning_rate=2e-3,
        max_steps=100,
        eval_every=50,
        max_seq_length=64,
    )
    return train(spec)


@pytest.fixture(scope="module")
def dora_run(wide_bert_dir, group_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora-run")
    spec = make_spec(
        wide_bert_dir,
        group_jsonl,
        out,
        method="lora",
        use_dora=True,
        lora_target_modules=["query", "value"],
        max_steps=10,
    )
    return train(spec)


# Learning ---------------------------------------------------------------------------------------


def test_full_fine_tune_learns_the_groups(full_run):
    before, after = accuracies(full_run)
    assert before < 0.5 and after >= 0.9


def test_lora_learns_the_groups(lora_run):
    before, after = accuracies(lora_run)
    assert before < 0.5 and after >= 0.85


def test_a_pair_classifier_learns_whether_two_words_belong_together(pair_run):
    before, after = accuracies(pair_run)
    assert before < 0.65 and after >= 0.9
    metrics = pair_run["result"]["metrics_after"]
    assert {"f1", "auroc", "macro_f1"} <= set(metrics) and metrics["auroc"] >= 0.9


def test_a_decoder_base_learns_the_groups(llama_run):
    before, after = accuracies(llama_run)
    assert before < 0.5 and after >= 0.85
    config = json.loads((Path(llama_run["result"]["artifact_dir"]) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None


@pytest.mark.slow
@pytest.mark.learning
def test_minilm_learns_the_sample_intents(minilm_run):
    before, after = accuracies(minilm_run)
    assert before < 0.5 and after >= 0.85, (before, after)


@pytest.mark.slow
@pytest.mark.learning
def test_minilm_learns_the_sample_faithfulness_pairs(minilm_pair_run):
    before, after = accuracies(minilm_pair_run)
    assert before <= 0.6 and after >= 0.8, (before, after)
    assert minilm_pair_run["result"]["metrics_after"]["auroc"] >= 0.9


def test_dora_adapts_only_the_named_layers_and_merges(dora_run):
    params = next(event for event in dora_run["events"] if event["kind"] == "params")
    assert [row["module"] for row in params["matrices"]] == ["query", "value", "classifier"]
    assert "DoRA" in (Path(dora_run["result"]["artifact_dir"]) / "README.md").read_text()


def test_head_only_changes_nothing_but_the_head(head_run, wide_bert_dir):
    base = load_file(wide_bert_dir / "model.safetensors")
    trained = load_file(Path(head_run["result"]["artifact_dir"]) / "model.safetensors")
    assert {f"bert.{name}" for name in base} | {"classifier.weight", "classifier.bias"} == set(trained)
    assert all(torch.equal(base[name], trained[f"bert.{name}"]) for name in base)
    initial = _initial_head(head_run["spec"], head_run["result"]["labels"])
    assert not torch.equal(initial, trained["classifier.weight"])
    params = next(event for event in head_run["events"] if event["kind"] == "params")
    hidden, labels = TINY_BERT["hidden_size"], 3
    assert params["trainable"] == hidden * labels + labels
    assert params["matrices"] == [
        {"module": "classifier", "shape": [labels, hidden], "count": 1, "full": 96, "lora": None, "ratio": None}
    ]
    before, after = accuracies(head_run)
    assert after >= before + 0.3


def _initial_head(spec: TrainSpec, labels: list[str]) -> torch.Tensor:
    from transformers import set_seed

    set_seed(spec.seed)  # as the recipe does before loading: the same random head
    model, _ = load_sequence_classifier(spec, labels)
    return model.classifier.weight.detach()


# Events and results -----------------------------------------------------------------------------


def test_it_reports_states_params_baseline_metrics_and_evals_in_order(full_run):
    events = full_run["events"]
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["preparing", "training", "evaluating", "exporting"]
    kinds = [event["kind"] for event in events]
    training = next(i for i, e in enumerate(events) if e.get("state") == "training")
    assert kinds.index("log") < kinds.index("params") < kinds.index("eval") < training < kinds.index("metric")
    assert kinds[-1] == "artifact"
    metrics = [event for event in events if event["kind"] == "metric"]
    assert [event["step"] for event in metrics] == list(range(1, 41))
    assert metrics[0]["total_steps"] == 40 and {"loss", "learning_rate", "epoch"} <= set(metrics[0])
    steps = evals(full_run)
    assert [event["step"] for event in steps] == [0, 10, 20, 30, 40]
    assert steps[0]["baseline"] is True and steps[-1]["final"] is True
    assert not any(event.get("final") for event in steps[:-1])
    assert {"accuracy", "macro_f1", "eval_loss", "confusion"} <= set(steps[0])
    assert steps[-1]["confusion"] == full_run["result"]["confusion_after"]


def test_evaluations_carry_how_far_the_encoder_moved_on_general_text(full_run, head_run):
    steps = evals(full_run)
    assert steps[0]["forgetting"] == 0.0 and full_run["result"]["metrics_before"]["forgetting"] == 0.0
    assert 0 < steps[-1]["forgetting"] == full_run["result"]["metrics_after"]["forgetting"] <= 2
    measured = [event["forgetting"] for event in evals(head_run) if "forgetting" in event]
    # The frozen encoder gives the same similarities up to float rounding between batches.
    assert len(measured) >= 2 and max(measured) < 1e-3, "a head-only job leaves the encoder as it was"


def test_the_result_holds_metrics_before_and_after_and_the_confusion_matrices(full_run):
    result = full_run["result"]
    assert result["primary_metric"] == "accuracy"
    assert result["steps"] == 40 and result["train_loss"] > 0
    assert result["labels"] == ["animal", "fruit", "vehicle"]
    assert result["metrics_before"] == {k: v for k, v in evals(full_run)[0].items() if k in result["metrics_before"]}
    confusion = result["confusion_after"]
    assert confusion["labels"] == result["labels"]
    assert sum(map(sum, confusion["matrix"])) == 36  # 20% of 180 rows, 12 per label
    assert [sum(row) for row in confusion["matrix"]] == [12, 12, 12]


def test_the_artifact_is_a_whole_classifier_with_label_names_and_card(full_run, lora_run):
    for run in (full_run, lora_run):  # a merged LoRA is a whole model too
        artifact = Path(run["result"]["artifact_dir"])
        names = {path.name for path in artifact.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "train_spec.json", "README.md"} <= names
        assert "adapter_config.json" not in names and not any(name.endswith(".bin") for name in names)
        config = json.loads((artifact / "config.json").read_text())
        assert config["id2label"] == {"0": "animal", "1": "fruit", "2": "vehicle"}
        assert config["architectures"] == ["BertForSequenceClassification"]
        card = (artifact / "README.md").read_text()
        job = run["spec"].job_id
        assert f'pipeline("text-classification", model="specialist-job-{job}-model")' in card
        assert "accuracy (held out) |" in card and "library_name: transformers" in card
    assert "merged into the weights" in (Path(lora_run["result"]["artifact_dir"]) / "README.md").read_text()


def test_lora_artifact_has_no_adapter_weights_left(lora_run):
    weights = load_file(Path(lora_run["result"]["artifact_dir"]) / "model.safetensors")
    assert not any("lora_" in name or "modules_to_save" in name for name in weights)
    params = next(event for event in lora_run["events"] if event["kind"] == "params")
    rows = {row["module"]: row for row in params["matrices"]}
    assert {"query", "key", "value", "dense", "classifier"} == set(rows)
    assert rows["query"]["lora"] == 16 * (32 + 32) and rows["query"]["count"] == 2
    assert rows["classifier"]["lora"] is None


@pytest.mark.parametrize(
    ("run_name", "base_name", "head"),
    [("lora_run", "wide_bert_dir", "classifier"), ("dora_run", "wide_bert_dir", "classifier"),
     ("llama_run", "tiny_llama_dir", "score")],
)  # fmt: skip
def test_a_lora_artifact_keeps_its_unmerged_adapter_which_on_the_base_predicts_like_the_merged_model(
    run_name, base_name, head, request
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, base = request.getfixturevalue(run_name), request.getfixturevalue(base_name)
    artifact = Path(run["result"]["artifact_dir"])
    adapter = artifact / ADAPTER_SUBDIR
    assert {path.name for path in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # base_reference: a local base is its path
    assert config["task_type"] == "SEQ_CLS" and head in config["modules_to_save"]
    assert config["use_dora"] is run["spec"].use_dora
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in name for name in weights) and f"base_model.model.{head}.weight" in weights
    for path in adapter.iterdir():  # readable like the rest of the artifact
        assert path.stat().st_mode == (artifact / "model.safetensors").stat().st_mode
    assert ADAPTER_NOTE in (artifact / "README.md").read_text()

    merged = AutoModelForSequenceClassification.from_pretrained(artifact).eval()
    labels = merged.config.id2label
    fresh = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=labels, label2id=merged.config.label2id,
        pad_token_id=merged.config.pad_token_id,
    )  # fmt: skip
    served = PeftModel.from_pretrained(fresh, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    inputs = tokenizer(["horse tiger zebra", "apple mango", "a truck and a boat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, got = merged(**inputs).logits, served(**inputs).logits
    assert expected.std() > 1e-3  # a trained head, not a constant
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_full_head_or_pair_full_artifact_has_no_adapter_folder(full_run, head_run, pair_run):
    for run in (full_run, head_run, pair_run):
        artifact = Path(run["result"]["artifact_dir"])
        assert not (artifact / ADAPTER_SUBDIR).exists()
        assert ADAPTER_NOTE not in (artifact / "README.md").read_text()


PIPELINE_SCRIPT = """
import json, sys
from transformers import pipeline

out = {}
for artifact, task, rows in json.loads(sys.stdin.read()):
    classifier = pipeline("text-classification", model=artifact)
    inputs = [{"text": r["text_a"], "text_pair": r["text_b"]} if task == "pair" else r["text"] for r in rows]
    out[artifact] = [{s["label"]: s["score"] for s in scores} for scores in classifier(inputs, top_k=None, truncation=True)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pipeline_predictions(full_run, lora_run, dora_run, head_run, pair_run, llama_run) -> dict:
    """Each artifact's probabilities on its held-out rows, from a pipeline in a fresh process."""
    jobs = []
    for run in (full_run, lora_run, dora_run, head_run, pair_run, llama_run):
        predictions = json.loads((Path(run["spec"].output_dir) / "eval_predictions.json").read_text())
        jobs.append([run["result"]["artifact_dir"], run["spec"].task, predictions])
    done = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("run_name", ["full_run", "lora_run", "dora_run", "head_run", "pair_run", "llama_run"])
def test_the_artifact_predicts_in_a_fresh_process_what_the_recipe_measured(run_name, request, pipeline_predictions):
    run = request.getfixturevalue(run_name)
    expected = json.loads((Path(run["spec"].output_dir) / "eval_predictions.json").read_text())
    got = pipeline_predictions[run["result"]["artifact_dir"]]
    assert len(got) == len(expected) > 0
    for row, probabilities in zip(expected, got, strict=True):
        assert probabilities == pytest.approx(row["probabilities"], abs=1e-5)
        assert max(probabilities, key=probabilities.get) == row["predicted"]
    hits = sum(row["predicted"] == row["label"] for row in expected)
    assert hits / len(expected) == run["result"]["metrics_after"]["accuracy"]


# Refusals and stops -----------------------------------------------------------------------------


def test_it_refuses_a_single_class(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": f"row {i}", "label": "spam"} for i in range(10)])
    with pytest.raises(UserError, match=r"only one class \('spam'\)"):
        classify.run(make_spec(tiny_bert_dir, data, tmp_path / "out", method="full"), Reporter())


def test_it_names_the_layers_an_encoder_has_when_lora_targets_are_missing(tiny_bert_dir, group_jsonl, tmp_path):
    spec = make_spec(tiny_bert_dir, group_jsonl, tmp_path / "out", method="lora")  # llama layer names
    with pytest.raises(UserError, match="q_proj.*no layers by that name.*dense, key, query, value"):
        classify.run(spec, Reporter())


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no rows"), ("{not json\n", "Line 1"), ('{"text": "x", "label": 3}\n', "text, label")],
)
def test_it_refuses_malformed_data(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        classify.read_rows(path, classify.FIELDS["classify"])


def test_a_stop_request_ends_training_and_raises_cancelled(tiny_bert_dir, group_jsonl, tmp_path):
    class StopAfterTwoSteps(Reporter):
        def metric(self, step, **values):
            super().metric(step, **values)
            if step == 2:
                self.stop_requested.set()

    reporter = StopAfterTwoSteps()
    with pytest.raises(Cancelled):
        classify.run(make_spec(tiny_bert_dir, group_jsonl, tmp_path / "out", method="full"), reporter)
    assert max(event["step"] for event in reporter.events if event["kind"] == "metric") <= 3
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize(("method", "task"), [("full", "classify"), ("lora", "classify"), ("full", "pair")])
def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_never_stopped(
    method, task, wide_bert_dir, group_jsonl, tmp_path
):
    data = group_jsonl if task == "classify" else write_jsonl(tmp_path / "pairs.jsonl", both_fruit_rows())
    settings = dict(
        task=task, method=method, max_steps=12, checkpoint_every=5, eval_every=5, lora_target_modules=["all-linear"]
    )
    spec = make_spec(wide_bert_dir, data, tmp_path / "resumed", **settings)
    first, second, result = interrupt_and_resume(classify.run, spec, stop_after=7)
    assert_resumed(first, second, checkpoint=5, total=12)
    uninterrupted = train(make_spec(wide_bert_dir, data, tmp_path / "once", **settings))
    assert_same_losses(second, uninterrupted["events"], after=5)
    assert result["metrics_after"] == pytest.approx(uninterrupted["result"]["metrics_after"])
    expected = baseline(first)
    assert result["metrics_before"] == {k: v for k, v in expected.items() if k != "confusion"}
    assert result["confusion_before"] == expected["confusion"]


def test_an_uploaded_validation_file_is_the_held_out_set(tiny_bert_dir, tmp_path):
    rows = group_rows(150)
    data, validation = (
        write_jsonl(tmp_path / "train.jsonl", rows[:120]),
        write_jsonl(tmp_path / "val.jsonl", rows[120:]),
    )
    spec = make_spec(tiny_bert_dir, data, tmp_path / "out", method="full", max_steps=2, validation_path=str(validation))
    run = train(spec)  # validation_fraction 0.2 is ignored: every dataset row trains
    assert any(e.get("message", "").startswith("120 training rows, 30 validation rows") for e in run["events"])
    predictions = json.loads((tmp_path / "out" / "eval_predictions.json").read_text())
    assert [p["text"] for p in predictions] == [row["text"] for row in rows[120:]]


def test_a_validation_label_that_no_training_row_has_is_refused(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", group_rows(60))
    validation = write_jsonl(
        tmp_path / "val.jsonl", [{"text": "apple", "label": "fruit"}, {"text": "oak", "label": "tree"}]
    )
    spec = make_spec(tiny_bert_dir, data, tmp_path / "out", method="full", validation_path=str(validation))
    with pytest.raises(UserError, match=r"Row 2 of the validation file has the label 'tree', which no training row"):
        classify.run(spec, Reporter())


# Parts ------------------------------------------------------------------------------------------


def test_the_split_is_stratified_seeded_and_keeps_every_label_in_training():
    rows = [{"text": f"a{i}", "label": "a"} for i in range(29)] + [{"text": f"b{i}", "label": "b"} for i in range(11)]
    rows.append({"text": "c", "label": "c"})
    train_rows, held_out = stratified_split(rows, 0.25, seed=1)
    # 10 = round(0.25 · 41) rows: shares 7.25 and 2.75 (and 0.25), the larger remainder rounds up.
    assert sorted(row["label"] for row in held_out) == ["a"] * 7 + ["b"] * 3
    assert {row["label"] for row in train_rows} == {"a", "b", "c"}
    assert stratified_split(rows, 0.25, seed=1) == (train_rows, held_out)
    assert stratified_split(rows, 0.25, seed=2)[1] != held_out
    assert len(stratified_split(rows[:4], 0.01, seed=1)[1]) == 1  # at least one
    assert stratified_split(rows, 0.0, seed=1) == (rows, [])
    singles = [{"text": str(i), "label": str(i)} for i in range(5)]
    assert stratified_split(singles, 0.5, seed=1) == (singles, [])


@pytest.mark.parametrize(
    ("labels", "positive"),
    [
        (["supported", "unsupported"], "supported"),
        (["entailment", "not_entailment"], "entailment"),
        (["no", "yes"], "yes"),
        (["0", "1"], "1"),
        (["ham", "spam"], "spam"),
    ],
)
def test_the_positive_label_of_two(labels, positive):
    assert labels[classify.positive_label(labels)] == positive


def test_binary_metrics_score_the_positive_label():
    labels = ["supported", "unsupported"]
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    metrics, confusion = classify.classification_metrics(probabilities, [0, 1, 1, 1], labels)
    assert metrics["accuracy"] == 0.75
    assert metrics["f1"] == pytest.approx(2 / 3)  # supported: precision 1/2, recall 1
    assert metrics["auroc"] == 1.0
    assert confusion == {"labels": labels, "matrix": [[1, 0], [1, 2]]}


def test_a_job_resumed_with_a_baseline_kept_before_the_forgetting_meter_finishes_without_it(
    tiny_bert_dir, group_jsonl, tmp_path
):
    """The base is gone by then (a full fine-tune): the meter stays off rather than taking the
    resumed model for the base, and the job finishes."""
    from tests.support.resume import StopAfter

    spec = make_spec(tiny_bert_dir, group_jsonl, tmp_path / "out", method="full", max_steps=6, checkpoint_every=3,
                     eval_every=3)
    with pytest.raises(Cancelled):
        classify.run(spec, StopAfter(4))
    kept = tmp_path / "out" / "baseline.json"
    old = json.loads(kept.read_text())
    assert old["probe"]  # what this version keeps; the earlier one did not
    kept.write_text(json.dumps({k: v for k, v in old.items() if k != "probe"}))
    resumed = Reporter()
    result = classify.run(spec, resumed)
    assert "Resuming from the checkpoint at step 3." in [e.get("message") for e in resumed.events]
    assert "accuracy" in result["metrics_after"] and "forgetting" not in result["metrics_after"]
    assert result["checkpoints"] == []  # nothing to weigh the checkpoints by
