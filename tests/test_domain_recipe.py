"""The domain-adaptation recipe on the tiny llama: documents packed without attention crossing
them, held-out perplexity falling, and an artifact that reloads and scores the same."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.model_fixtures import write_jsonl
from webapp.datasets.samples import domain as samples
from worker import forgetting
from worker.events import Reporter
from worker.recipes import domain
from worker.spec import TrainSpec

pytestmark = pytest.mark.learning


@pytest.fixture(scope="module")
def documents_jsonl(tmp_path_factory) -> Path:
    # 40 of the sample manual's pages (~4000 tokens): the tiny llama's 49k-word output layer is
    # most of the cost of a step, and every token of a packed row is scored.
    return write_jsonl(tmp_path_factory.mktemp("domain-data") / "documents.jsonl", samples.rows()[:40])


def make_spec(base: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    settings = dict(task="domain", max_steps=8, batch_size=4, max_seq_length=32, eval_every=4, validation_fraction=0.1)
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def train(spec: TrainSpec) -> dict:
    reporter = Reporter()
    result = domain.run(spec, reporter)
    return {"result": result, "events": reporter.events, "spec": spec}


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, documents_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("domain-lora")
    return train(make_spec(tiny_llama_dir, documents_jsonl, out, method="lora", learning_rate=2e-2, job_id=7))


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, documents_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("domain-full")
    return train(make_spec(tiny_llama_dir, documents_jsonl, out, method="full", learning_rate=3e-3))


# Packing -----------------------------------------------------------------------------------------


def test_documents_are_packed_into_full_rows_with_positions_restarting_at_each_piece():
    packed = domain.pack([[1, 2, 3], [4, 5, 6, 7, 8], [9]], length=4, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert packed.document.tolist() == [[0, 0, 0, 1], [1, 1, 1, 1], [2, -1, -1, -1]]
    # Every token is a target except the first of each piece (predicted from another document, or
    # from nothing) and the padding.
    assert packed.labels.tolist() == [[-100, 2, 3, -100], [-100, 6, 7, 8], [-100, -100, -100, -100]]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_does_not_cross_documents(tiny_llama_dir, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    first, second = domain.tokenize([{"text": "Valve KV-40 leaks at the stem."}, {"text": "Torque to 35 Nm."}], tokenizer)

    def logits(ids: list[list[int]], length: int) -> torch.Tensor:
        batch = domain.collate([domain.pack(ids, length, tokenizer.pad_token_id)[0]])
        del batch["labels"]
        with torch.no_grad():
            return model(**batch).logits[0]

    together = logits([first, second], len(first) + len(second))
    alone = logits([second], len(second))
    assert torch.allclose(together[len(first):], alone, atol=1e-5)
    # The same tokens read as one sequence (no restart) see the first document: the check has teeth.
    with torch.no_grad():
        crossing = model(input_ids=torch.tensor([first + second]), use_cache=False).logits[0]
    assert not torch.allclose(crossing[len(first):], alone, atol=1e-3)


# The recipe --------------------------------------------------------------------------------------


def evals(run: dict) -> list[dict]:
    return [event for event in run["events"] if event["kind"] == "eval"]


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_training_lowers_the_held_out_perplexity(request, run):
    result = request.getfixturevalue(run)["result"]
    before, after = result["metrics_before"], result["metrics_after"]
    assert result["primary_metric"] == "perplexity" and result["steps"] == 8
    assert after["perplexity"] < before["perplexity"] / 4, (before, after)
    assert after["perplexity"] == pytest.approx(math.exp(after["eval_loss"]))


def test_it_reports_states_params_metrics_and_evals_in_order(lora_run):
    events = lora_run["events"]
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["preparing", "training", "evaluating", "exporting"]
    kinds = [event["kind"] for event in events]
    assert kinds.index("params") < kinds.index("eval") < kinds.index("metric") < kinds.index("artifact")
    held = evals(lora_run)
    assert [event["step"] for event in held] == [0, 4, 8]
    assert held[0]["baseline"] is True and held[-1]["final"] is True
    keys = ("perplexity", "eval_loss", "general_perplexity", "general_kl", "forgetting", "general_kl_coverage")
    assert lora_run["result"]["metrics_before"] == {key: held[0][key] for key in keys}
    assert any("held-out documents" in event.get("message", "") for event in events if event["kind"] == "log")


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_every_evaluation_measures_forgetting_and_the_general_prompts_are_answered(request, run):
    result = request.getfixturevalue(run)["result"]
    held = evals(request.getfixturevalue(run))
    assert held[0]["forgetting"] == 0 and all(event["forgetting"] == event["general_kl"] > 0 for event in held[1:])
    assert result["metrics_after"]["forgetting"] == held[-1]["forgetting"]
    assert result["metrics_after"]["general_perplexity"] != result["metrics_before"]["general_perplexity"]
    # The tiny llama has the SmolLM2 chat template, so it answers the general prompts.
    assert [answer["prompt"] for answer in result["general_answers"]] == forgetting.general_prompts()


def test_a_base_without_a_chat_template_measures_forgetting_but_answers_nothing(tiny_llama_dir, documents_jsonl,
                                                                               tmp_path):
    plain = tmp_path / "plain-llama"
    shutil.copytree(tiny_llama_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    run = train(make_spec(plain, documents_jsonl, tmp_path / "out", method="lora", learning_rate=2e-2, max_steps=2,
                          eval_every=2))
    assert run["result"]["general_answers"] == [] and "forgetting" in run["result"]["metrics_after"]
    assert any("no chat template" in event.get("message", "") for event in run["events"] if event["kind"] == "log")


def test_the_lora_artifact_reloads_and_scores_the_held_out_documents_the_same(lora_run, tiny_llama_dir):
    final = Path(lora_run["result"]["artifact_dir"])
    assert (final / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), final)
    assert_scores_like_the_job(model, final, lora_run)


def test_the_full_artifact_reloads_and_scores_the_held_out_documents_the_same(full_run):
    final = Path(full_run["result"]["artifact_dir"])
    assert_scores_like_the_job(AutoModelForCausalLM.from_pretrained(final), final, full_run)


def assert_scores_like_the_job(model, final: Path, run: dict) -> None:
    spec = run["spec"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    _, held_out = domain.read_documents(spec)
    rows = domain.pack(domain.tokenize(held_out, tokenizer), spec.max_seq_length, tokenizer.pad_token_id)
    again = domain.held_out_loss(model, rows, len(held_out), spec.batch_size)
    predictions = json.loads((Path(spec.output_dir) / "eval_predictions.json").read_text())
    assert [p["loss_after"] for p in predictions] == pytest.approx(again.document_losses, rel=1e-4)
    assert again.metrics["perplexity"] == pytest.approx(run["result"]["metrics_after"]["perplexity"], rel=1e-4)
    assert all(p["perplexity_after"] < p["perplexity_before"] for p in predictions)


def test_an_uploaded_validation_file_holds_out_its_documents(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    validation = write_jsonl(tmp_path / "validation.jsonl", [{"text": "beta"}, {"text": "gamma"}])

    def texts(drop_overlap: bool) -> tuple[list[str], list[str]]:
        spec = make_spec(tmp_path, data, tmp_path / "out", validation_path=str(validation), drop_validation_overlap=drop_overlap)
        train, held_out = domain.read_documents(spec)
        return [row["text"] for row in train], sorted(row["text"] for row in held_out)

    assert texts(drop_overlap=False) == (["alpha", "beta"], ["beta", "gamma"])
    assert texts(drop_overlap=True) == (["alpha"], ["beta", "gamma"])  # the document both have trains no more


def test_the_pre_flight_shows_a_document_as_packed_with_the_loss_on_every_token_but_the_first(tiny_llama_dir):
    from worker.preflight import domain_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    shown = domain_example(1, {"text": "Torque the bonnet bolts. " * 20}, tokenizer, 16)["sequences"][0]
    assert shown["tokens"] > 16 and shown["cut"] == 0 and len(shown["spans"]) <= 16
    assert [span["loss"] for span in shown["spans"]][:2] == [False, True] and all(s["loss"] for s in shown["spans"][1:])
