"""The rerank recipe end to end on the tiny BERT and on all-MiniLM-L6-v2, plus its metrics and data handling."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.support.resume import assert_resumed, assert_same_losses, baseline, interrupt_and_resume
from webapp.datasets.samples import rerank as sample
from worker.checkpoints import latest_checkpoint
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.params import census
from worker.recipes import rerank
from worker.sentence_models import ADAPTER_NOTE, ADAPTER_SUBDIR
from worker.spec import TrainSpec

ANIMALS = [
    "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "deer",
    "mouse", "frog",
]  # fmt: skip
FRUITS = ["apple", "pear", "plum", "grape", "lemon", "cherry", "peach", "mango"]
STONES = ["rock", "sand", "clay", "iron", "coal", "salt", "glass", "brick"]


def marker_rows(queries: int = 60, documents: int = 10) -> list[dict]:
    """A trivially learnable ranking: the relevant document of each query names a fruit, the nine
    others a stone (amid random animals). Eight words of each kind, so an untrained model has no
    consistent preference and starts near chance."""
    rng = random.Random(0)
    rows = []
    for i in range(queries):
        query = f"question {i} about {rng.choice(ANIMALS)}"
        docs = [(f"{rng.choice(ANIMALS)} {rng.choice(ANIMALS)} {rng.choice(FRUITS)}", 1.0)]
        docs += [
            (f"{rng.choice(ANIMALS)} {rng.choice(ANIMALS)} {rng.choice(STONES)}", 0.0) for _ in range(documents - 1)
        ]
        rng.shuffle(docs)
        rows += [{"query": query, "document": d, "relevance": r} for d, r in docs]
    return rows


def make_spec(base: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    settings = dict(
        task="rerank",
        method="full",
        learning_rate=3e-3,
        max_steps=20,
        batch_size=4,
        eval_every=10,
        validation_fraction=0.25,
        max_seq_length=64,
    )
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def train(spec: TrainSpec) -> dict:
    reporter = Reporter()
    result = rerank.run(spec, reporter)
    return {"result": result, "events": reporter.events, "spec": spec}


def evals(events: list[dict]) -> list[dict]:
    return [event for event in events if event["kind"] == "eval"]


@pytest.fixture(scope="module")
def marker_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rerank-data") / "rerank.jsonl", marker_rows())


@pytest.fixture(scope="module")
def full_run(tiny_bert_dir, marker_jsonl, tmp_path_factory):
    return train(make_spec(tiny_bert_dir, marker_jsonl, tmp_path_factory.mktemp("rerank-full"), job_id=7))


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, marker_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("rerank-lora")
    spec = make_spec(tiny_bert_dir, marker_jsonl, out, method="lora", max_steps=10, lora_target_modules=["all-linear"])
    return train(spec)


def test_training_lifts_ndcg_far_above_the_untouched_model(full_run):
    before, after = full_run["result"]["metrics_before"], full_run["result"]["metrics_after"]
    assert after["ndcg@10"] >= before["ndcg@10"] + 0.2, (before, after)
    assert after["ndcg@10"] >= 0.9 and after["mrr@10"] >= 0.9


def test_it_reports_states_params_baseline_metrics_and_evals_in_order(full_run):
    events = full_run["events"]
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["preparing", "training", "evaluating", "exporting"]
    kinds = [event["kind"] for event in events]
    assert kinds.index("log") < kinds.index("params") < kinds.index("eval") < kinds.index("metric")
    assert kinds.index("eval") < events.index(next(e for e in events if e.get("state") == "training"))
    assert kinds.index("artifact") == len(kinds) - 1
    metrics = [event for event in events if event["kind"] == "metric"]
    assert [event["step"] for event in metrics] == list(range(1, 21))
    assert metrics[0]["total_steps"] == 20 and {"loss", "learning_rate", "epoch"} <= set(metrics[0])
    steps = [(event["step"], event.get("baseline", False), event.get("final", False)) for event in evals(events)]
    assert steps == [(0, True, False), (10, False, False), (20, False, True)]
    assert all({"ndcg@10", "mrr@10"} <= set(event) for event in evals(events))
    log = next(event["message"] for event in events if event["kind"] == "log")
    assert log == "45 training queries (450 rows), 15 held-out queries (150 rows)."


def test_the_result_names_the_primary_metric_and_matches_the_evals(full_run):
    result, events = full_run["result"], full_run["events"]
    assert result["primary_metric"] == "ndcg@10" and result["steps"] == 20
    baseline, final = evals(events)[0], evals(events)[-1]
    assert result["metrics_before"] == {key: baseline[key] for key in ("ndcg@10", "mrr@10", "forgetting")}
    assert result["metrics_after"] == {key: final[key] for key in ("ndcg@10", "mrr@10", "forgetting")}
    assert result["train_loss"] == [e["loss"] for e in events if e["kind"] == "metric"][-1]


def test_evaluations_carry_how_far_the_encoder_moved_on_general_text(full_run, lora_run):
    for run in (full_run, lora_run):
        steps = evals(run["events"])
        assert steps[0]["forgetting"] == 0.0
        assert 0 < steps[-1]["forgetting"] == run["result"]["metrics_after"]["forgetting"] <= 2


def test_lora_trains_adapters_on_every_linear_layer_and_the_head(lora_run):
    params = next(event for event in lora_run["events"] if event["kind"] == "params")
    assert params["method"] == "lora" and 0 < params["trainable"] < params["total"] / 10
    assert {"query", "key", "value", "dense"} <= {row["module"] for row in params["matrices"]}
    # A random 32-wide encoder learns this slowly through adapters alone; that the ranking moved
    # shows the adapters and the head were trained (the artifact test shows they were merged).
    assert lora_run["result"]["metrics_after"] != lora_run["result"]["metrics_before"]
    assert lora_run["result"]["steps"] == 10


LOAD_AND_SCORE = """
import json, sys
from sentence_transformers import CrossEncoder
for folder, predictions in zip(sys.argv[1::2], sys.argv[2::2]):
    rows = json.load(open(predictions))
    model = CrossEncoder(folder)
    scores = model.predict([(row["query"], row["document"]) for row in rows]).tolist()
    ranked = model.rank(rows[0]["query"], [row["document"] for row in rows if row["query"] == rows[0]["query"]])
    print(json.dumps({"scores": scores, "top": ranked[0]["corpus_id"]}))
"""


def test_the_artifacts_load_in_a_fresh_process_and_score_like_the_evaluation(full_run, lora_run):
    runs = [full_run, lora_run]
    args = []
    for run in runs:
        artifact = Path(run["result"]["artifact_dir"])
        args += [str(artifact), str(Path(run["spec"].output_dir) / "eval_predictions.json")]
    done = subprocess.run([sys.executable, "-c", LOAD_AND_SCORE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for run, line in zip(runs, done.stdout.splitlines(), strict=True):
        predictions = json.loads((Path(run["spec"].output_dir) / "eval_predictions.json").read_text())
        loaded = json.loads(line)
        assert len(predictions) == 150
        assert loaded["scores"] == pytest.approx([row["score"] for row in predictions], abs=1e-6)
        first_query = [row for row in predictions if row["query"] == predictions[0]["query"]]
        assert first_query[loaded["top"]]["score"] == max(row["score"] for row in first_query)


def test_the_artifact_is_a_cross_encoder_folder_with_weights_in_safetensors(full_run, lora_run):
    for run in (full_run, lora_run):
        names = {path.name for path in Path(run["result"]["artifact_dir"]).iterdir()}
        assert {
            "model.safetensors",
            "config.json",
            "modules.json",
            "tokenizer.json",
            "train_spec.json",
            "README.md",
        } <= names
        assert not names & {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"}
    card = (Path(full_run["result"]["artifact_dir"]) / "README.md").read_text()
    assert 'CrossEncoder("specialist-job-7-model")' in card and "library_name: sentence-transformers" in card
    assert "| ndcg@10 (held out) |" in card
    assert not (Path(full_run["result"]["artifact_dir"]) / ADAPTER_SUBDIR).exists() and ADAPTER_NOTE not in card


def test_a_lora_artifact_keeps_its_unmerged_adapter_which_on_the_base_scores_like_the_merged_model(
    lora_run, tiny_bert_dir
):
    from peft import PeftModel
    from safetensors.torch import load_file
    from sentence_transformers import CrossEncoder
    from torch.nn import Identity

    artifact = Path(lora_run["result"]["artifact_dir"])
    adapter = artifact / ADAPTER_SUBDIR
    assert {path.name for path in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir) and config["task_type"] == "SEQ_CLS"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in weights  # the scoring head, from modules_to_save
    assert any(name.endswith("lora_B.weight") and weights[name].abs().max() > 0 for name in weights)  # trained
    for path in adapter.iterdir():
        assert path.stat().st_mode == (artifact / "model.safetensors").stat().st_mode
    assert ADAPTER_NOTE in (artifact / "README.md").read_text()

    pairs = rerank_pairs(lora_run)
    served = CrossEncoder(str(tiny_bert_dir), num_labels=1)
    bare = served.predict(pairs, activation_fn=Identity(), show_progress_bar=False)
    served[0].model = PeftModel.from_pretrained(served[0].model, adapter)
    expected = CrossEncoder(str(artifact)).predict(pairs, activation_fn=Identity(), show_progress_bar=False)
    got = served.predict(pairs, activation_fn=Identity(), show_progress_bar=False)
    # The tiny encoder's logits spread over about 2e-4 (the scores all sit near 0.505); the
    # reattached adapter matches them to float precision and ranks the documents the same way.
    assert got == pytest.approx(expected, abs=1e-6) and (got.argsort() == expected.argsort()).all()
    assert abs(bare - expected).max() > 1e-3  # without the adapter: another (random) head


def rerank_pairs(run: dict) -> list[tuple[str, str]]:
    rows = json.loads((Path(run["spec"].output_dir) / "eval_predictions.json").read_text())[:20]
    return [(row["query"], row["document"]) for row in rows]


def test_head_trains_only_the_scoring_head(tiny_bert_dir, marker_jsonl, tmp_path):
    spec = make_spec(tiny_bert_dir, marker_jsonl, tmp_path, method="head")
    model = rerank.load_cross_encoder(spec)
    rerank.apply_method(model, spec)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable == ["0.model.classifier.weight", "0.model.classifier.bias"]
    assert census(model, spec)["trainable"] == 32 + 1  # hidden size 32 → one score


def test_it_names_the_models_layers_when_a_lora_target_does_not_exist(tiny_bert_dir, marker_jsonl, tmp_path):
    spec = make_spec(tiny_bert_dir, marker_jsonl, tmp_path, method="lora", lora_target_modules=["q_proj", "value"])
    model = rerank.load_cross_encoder(spec)
    with pytest.raises(UserError, match=r"cannot adapt q_proj: .* layers are dense, key, query, value"):
        rerank.apply_method(model, spec)
    spec.lora_target_modules = ["self.query", "value"]  # peft's suffix matching
    rerank.apply_method(model, spec)
    assert census(model, spec)["matrices"][0]["count"] == 2  # one query and one value per layer, each 32 x 32


def test_it_refuses_a_text_generating_base(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    spec = make_spec(tmp_path, tmp_path / "none.jsonl", tmp_path / "out")
    with pytest.raises(UserError, match="text-generating model"):
        rerank.load_cross_encoder(spec)


def test_a_stop_request_ends_training_and_raises_cancelled(tiny_bert_dir, marker_jsonl, tmp_path):
    class StopAfterTwoSteps(Reporter):
        def metric(self, step, **values):
            super().metric(step, **values)
            if step == 2:
                self.stop_requested.set()

    reporter = StopAfterTwoSteps()
    with pytest.raises(Cancelled):
        rerank.run(make_spec(tiny_bert_dir, marker_jsonl, tmp_path / "out", validation_fraction=0.0), reporter)
    assert max(event["step"] for event in reporter.events if event["kind"] == "metric") <= 3
    assert not (tmp_path / "out" / "final").exists()
    assert "exporting" not in [event.get("state") for event in reporter.events]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_never_stopped(
    method, tiny_bert_dir, marker_jsonl, tmp_path
):
    settings = dict(method=method, max_steps=12, checkpoint_every=5, eval_every=5, lora_target_modules=["all-linear"])
    spec = make_spec(tiny_bert_dir, marker_jsonl, tmp_path / "resumed", **settings)
    first, second, result = interrupt_and_resume(rerank.run, spec, stop_after=7)
    assert_resumed(first, second, checkpoint=5, total=12)
    uninterrupted = train(make_spec(tiny_bert_dir, marker_jsonl, tmp_path / "once", **settings))
    assert_same_losses(second, uninterrupted["events"], after=5)
    assert result["metrics_after"] == pytest.approx(uninterrupted["result"]["metrics_after"])
    assert result["metrics_before"] == baseline(first)
    assert (tmp_path / "resumed" / "final" / "model.safetensors").is_file()
    checkpoint = Path(latest_checkpoint(tmp_path / "resumed"))
    assert TrainSpec.from_json((checkpoint / "train_spec.json").read_text()) == spec, "a checkpoint says how it was made"


def test_an_uploaded_validation_file_is_the_held_out_set_ranked_by_query(tiny_bert_dir, tmp_path):
    rows = marker_rows(queries=30)
    data, validation = (
        write_jsonl(tmp_path / "train.jsonl", rows[:250]),
        write_jsonl(tmp_path / "val.jsonl", rows[250:]),
    )
    spec = make_spec(tiny_bert_dir, data, tmp_path / "out", max_steps=2, validation_path=str(validation))
    run = train(spec)  # validation_fraction 0.25 is ignored: every dataset query trains
    assert any(
        e.get("message", "").startswith("25 training queries (250 rows), 5 held-out queries (50 rows)")
        for e in run["events"]
    )
    predictions = json.loads((tmp_path / "out" / "eval_predictions.json").read_text())
    assert [(p["query"], p["document"]) for p in predictions] == [(r["query"], r["document"]) for r in rows[250:]]
    assert set(evals(run["events"])[-1]) >= {"ndcg@10", "mrr@10"}


def test_a_validation_file_without_a_relevant_document_is_refused(tiny_bert_dir, marker_jsonl, tmp_path):
    validation = write_jsonl(tmp_path / "val.jsonl", [{"query": "q", "document": "d", "relevance": 0}])
    spec = make_spec(tiny_bert_dir, marker_jsonl, tmp_path / "out", validation_path=str(validation))
    with pytest.raises(UserError, match="No document in the validation file has a relevance above 0"):
        rerank.run(spec, Reporter())


# Metrics -----------------------------------------------------------------------------------------


def rows_of(query: str, relevances: list[float]) -> list[dict]:
    return [{"query": query, "document": f"{query} doc {i}", "relevance": rel} for i, rel in enumerate(relevances)]


def test_ndcg_uses_graded_gains_and_mrr_the_first_relevant_document():
    rows = rows_of("a", [0, 3, 1]) + rows_of("b", [0, 0]) + rows_of("c", [1, 0])
    scores = [0.9, 0.5, 0.1] + [0.3, 0.2] + [0.2, 0.8]
    # a ranks relevances 0, 3, 1; the ideal order is 3, 1, 0. b has nothing relevant: skipped.
    ndcg_a = (7 / math.log2(3) + 1 / math.log2(4)) / (7 + 1 / math.log2(3))
    ndcg_c = (1 / math.log2(3)) / 1
    metrics = rerank.ranking_metrics(rows, scores)
    assert metrics["ndcg@10"] == pytest.approx((ndcg_a + ndcg_c) / 2)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_a_relevant_document_below_rank_ten_counts_for_nothing():
    rows = rows_of("a", [0] * 10 + [1])
    scores = [1.0 - i / 100 for i in range(11)]
    assert rerank.ranking_metrics(rows, scores) == {"ndcg@10": 0.0, "mrr@10": 0.0}
    assert rerank.ranking_metrics(rows, scores[::-1]) == {"ndcg@10": 1.0, "mrr@10": 1.0}


# Data --------------------------------------------------------------------------------------------


def test_the_split_keeps_each_query_whole_and_holds_out_only_queries_with_a_relevant_document():
    rows = marker_rows(queries=20, documents=3) + rows_of("nothing relevant", [0, 0, 0])
    train_rows, held_out = rerank.split_by_query(rows, 0.25, seed=3)
    held_queries = {row["query"] for row in held_out}
    assert len(held_queries) == 5 and "nothing relevant" not in held_queries
    assert not held_queries & {row["query"] for row in train_rows}
    assert len(train_rows) + len(held_out) == len(rows)
    assert rerank.split_by_query(rows, 0.25, seed=3) == (train_rows, held_out)
    assert rerank.split_by_query(rows, 0.25, seed=4) != (train_rows, held_out)
    assert rerank.split_by_query(rows, 0.0, seed=3) == (rows, [])


def test_only_queries_with_an_order_to_learn_become_training_lists():
    rows = rows_of("a", [0, 2, 1]) + rows_of("b", [1, 1]) + rows_of("c", [0])
    lists = rerank.query_lists(rows)
    assert lists["query"] == ["a"]
    assert lists["documents"] == [["a doc 0", "a doc 1", "a doc 2"]] and lists["labels"] == [[0, 2, 1]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (rows_of("a", [0, 0]) + rows_of("b", [0]), "No document has a relevance above 0"),
        (rows_of("a", [1]) + rows_of("b", [0]) + rows_of("c", [1]), "No query has documents of different relevance"),
    ],
)
def test_it_refuses_data_without_anything_to_rank(rows, message, tmp_path):
    spec = make_spec("unused", write_jsonl(tmp_path / "data.jsonl", rows), tmp_path, validation_fraction=0.0)
    with pytest.raises(UserError, match=message):
        rerank.prepare_data(spec, Reporter())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no rows"),
        ("{not json\n", "Line 1"),
        ('{"query": "q", "relevance": 1}\n', "query and document"),
        ('{"query": "q", "document": "d", "relevance": -1}\n', "at least 0"),
        ('{"query": "q", "document": "d", "relevance": "high"}\n', "at least 0"),
        ('{"query": "q", "document": "d", "relevance": true}\n', "at least 0"),
    ],
)
def test_it_refuses_malformed_rows(content, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        rerank.read_rows(path)


# The real model on the sample data ---------------------------------------------------------------


@pytest.mark.slow
def test_minilm_learns_the_sample_help_centre_ranking(minilm_dir, tmp_path):
    data = write_jsonl(tmp_path / "sample.jsonl", sample.rows())
    spec = make_spec(
        minilm_dir, data, tmp_path / "out", learning_rate=5e-4, max_steps=10, eval_every=100, validation_fraction=0.15
    )
    result = train(spec)["result"]
    before, after = result["metrics_before"], result["metrics_after"]
    assert after["ndcg@10"] >= before["ndcg@10"] + 0.2, (before, after)
