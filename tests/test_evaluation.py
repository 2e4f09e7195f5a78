"""Evaluation on your own test set: through the real stack (two classifiers trained by the worker,
an uploaded test set, an evaluation job over the base and both), the leaderboard and the per-row
CSV, and the same accuracy from the downloaded artifact in a fresh process; the per-row files
safe to open in a spreadsheet; and worker.evaluation on its own for every other family, each on a
tiny recipe job whose validation file is the test set: the base scores what the job measured at
step 0, the fine-tune what its final evaluation reported, and a model against itself changes no
row."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.test_classify_recipe import group_rows
from tests.test_dpo_recipe import preference_rows
from tests.test_embed_recipe import tag_rows
from tests.test_kto_recipe import feedback_rows
from tests.test_rerank_recipe import marker_rows
from webapp.datasets.samples import domain as domain_samples
from worker.errors import UserError
from worker.evaluation import EVALUATORS, row_records, spreadsheet_safe
from worker.events import Reporter
from worker.families import FAMILIES
from worker.spec import EvalModel, EvalSpec, SpecError, TrainSpec

USER = "evaluator"
FINAL = ("succeeded", "failed", "cancelled")
CLASSIFIER = {"method": "full", "batch_size": 16, "max_seq_length": 32}
PREDICT = """
import json, sys
from transformers import pipeline
folder, rows = sys.argv[1], json.loads(open(sys.argv[2]).read())
classify = pipeline("text-classification", model=folder)
print(json.dumps([classify(row["text"])[0]["label"] for row in rows]))
"""


def test_text_a_spreadsheet_would_run_is_kept_as_text():
    assert [spreadsheet_safe(v) for v in ("=SUM(A1)", "+1", "-2", "@x", "plain", 3.5)] == [
        "'=SUM(A1)", "'+1", "'-2", "'@x", "plain", 3.5]


def test_the_change_is_positive_when_the_last_model_did_better():
    from worker.evaluation import Scored

    spec = EvalSpec(task="sft", dataset_path="", output_dir="", models=[EvalModel("a", {}), EvalModel("b", {})])
    rows = [{"instruction": "q", "response": "r"}]
    losses = row_records(spec, rows, [Scored({}, ["x"], [2.0]), Scored({}, ["y"], [0.5])])
    assert losses[0]["change"] == 1.5  # the loss fell
    spec.task = "classify"
    labels = row_records(spec, [{"text": "t", "label": "l"}], [Scored({}, ["a"], [1.0]), Scored({}, ["b"], [0.0])])
    assert labels[0]["change"] == -1.0  # right, then wrong


@pytest.fixture(scope="module")
def evaluated(stack, tiny_bert_dir, tmp_path_factory):
    stack.create_user(USER)
    http = stack.session(USER)
    folder = tmp_path_factory.mktemp("evaluation")
    rows = group_rows(240)
    train = stack.upload_dataset(http, write_jsonl(folder / "train.jsonl", rows[:180]), task="classify")
    test_rows = rows[180:]
    test = stack.upload_dataset(http, write_jsonl(folder / "test.jsonl", test_rows), task="classify")
    jobs = [stack.submit_job(http, train, tiny_bert_dir, learning_rate=2e-2, max_steps=40, **CLASSIFIER),
            stack.submit_job(http, train, tiny_bert_dir, learning_rate=1e-4, max_steps=5, **CLASSIFIER)]
    for job_id in jobs:
        assert stack.wait_for(job_id, lambda j: j["state"] in FINAL, timeout=400)["state"] == "succeeded"
    page = f"{stack.base_url}/datasets/{test}/"
    reply = http.post(f"{stack.base_url}/datasets/{test}/evaluate/", headers={"Referer": page}, data={
        "csrfmiddlewaretoken": stack.csrf(http, f"/datasets/{test}/"), "jobs": jobs, "include_base": "on"})
    match = re.search(r"/jobs/(\d+)/$", reply.url)
    assert match, reply.text[:3000]
    evaluation = int(match.group(1))
    done = stack.wait_for(evaluation, lambda j: j["state"] in FINAL, timeout=400)
    assert done["state"] == "succeeded", (done["message"], stack.log_tail("worker"))
    return {"http": http, "jobs": jobs, "test": test, "test_rows": test_rows, "evaluation": evaluation,
            "result": done["result"], "folder": folder}


@pytest.mark.slow
@pytest.mark.long
def test_an_evaluation_job_scores_the_base_and_each_fine_tune_on_every_row(stack, evaluated):
    board = evaluated["result"]["leaderboard"]
    first, second = evaluated["jobs"]
    assert [entry["label"].split(":")[0] for entry in board] == ["Base model", f"Job {first}", f"Job {second}"]
    accuracy = [entry["metrics"]["accuracy"] for entry in board]
    assert accuracy[1] >= 0.9 > accuracy[0] and accuracy[1] > accuracy[2]
    assert evaluated["result"]["rows"] == 60
    http = evaluated["http"]
    page = http.get(f"{stack.base_url}/jobs/{evaluated['evaluation']}/").text
    assert 'id="leaderboard"' in page and f"Job {first}" in page
    dataset_page = http.get(f"{stack.base_url}/datasets/{evaluated['test']}/").text
    assert 'id="leaderboard"' in dataset_page and f"job {evaluated['evaluation']}" in dataset_page
    rows_page = http.get(f"{stack.base_url}/jobs/{evaluated['evaluation']}/rows/?sort=worse").text
    assert 'id="rows"' in rows_page


@pytest.mark.slow
@pytest.mark.long
def test_the_rows_csv_and_a_fresh_process_on_the_download_agree_with_the_leaderboard(stack, evaluated):
    http, first = evaluated["http"], evaluated["jobs"][0]
    reply = http.get(f"{stack.base_url}/jobs/{evaluated['evaluation']}/rows.csv")
    assert reply.status_code == 200 and "attachment" in reply.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(reply.content.decode())))
    assert len(table) == 60 and [row["reference"] for row in table] == [r["label"] for r in evaluated["test_rows"]]
    label_column = next(name for name in table[0] if name.startswith(f"Job {first}") and name.endswith(": output"))

    download = http.get(f"{stack.base_url}/jobs/{first}/download/")
    folder = evaluated["folder"] / "artifact"
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(folder)
    model = next(p.parent for p in folder.rglob("config.json"))
    (evaluated["folder"] / "rows.json").write_text(json.dumps(evaluated["test_rows"]))
    done = subprocess.run([sys.executable, "-c", PREDICT, str(model), str(evaluated["folder"] / "rows.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = json.loads(done.stdout.splitlines()[-1])
    assert predicted == [row[label_column] for row in table]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, evaluated["test_rows"], strict=True)) / 60
    board = {entry["label"].split(":")[0]: entry["metrics"] for entry in evaluated["result"]["leaderboard"]}
    assert accuracy == pytest.approx(board[f"Job {first}"]["accuracy"])


@pytest.mark.slow
@pytest.mark.long
def test_another_users_evaluation_and_rows_are_not_found(stack, evaluated):
    stack.create_user("stranger")
    http = stack.session("stranger")
    for path in ("", "rows/", "rows.csv"):
        assert http.get(f"{stack.base_url}/jobs/{evaluated['evaluation']}/{path}").status_code == 404


@pytest.mark.slow
def test_instruction_tuning_is_scored_by_the_reference_replys_loss_and_greedy_replies(tiny_llama_dir, tmp_path):
    """worker.evaluation on its own: the base and a LoRA adapter of the tiny llama (its B matrices
    set, so it differs from the base) on a small test set."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.evaluation import run
    from worker.events import Reporter
    from worker.spec import TrainSpec

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(adapter)
    data = write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": f"Say {n}.", "response": f"=SUM({n})"} for n in range(6)])
    from dataclasses import asdict

    spec_dict = asdict(TrainSpec(base_model=str(tiny_llama_dir), dataset_path=str(data), output_dir=str(tmp_path)))
    spec = EvalSpec(task="sft", dataset_path=str(data), output_dir=str(tmp_path / "out"), max_seq_length=64,
                    models=[EvalModel("Base model", spec_dict), EvalModel("Job 1: t", spec_dict, str(adapter), 1)])
    reporter = Reporter()
    result = run(spec, reporter)
    base, tuned = (entry["metrics"] for entry in result["leaderboard"])
    assert set(base) == {"eval_loss", "perplexity", "exact_match"} and base["eval_loss"] != tuned["eval_loss"]
    records = json.loads(Path(result["rows_json"]).read_text())
    assert len(records) == 6 and records[0]["reference"] == "=SUM(0)" and records[0]["models"][1]["output"] is not None
    assert records[0]["change"] == pytest.approx(records[0]["models"][0]["score"] - records[0]["models"][1]["score"])
    table = list(csv.reader(io.StringIO(Path(result["rows_csv"]).read_text())))
    assert table[1][2] == "'=SUM(0)"  # a formula in the user's data stays text in the CSV
    assert [e["step"] for e in reporter.events if e["kind"] == "metric"] == [1, 2]


# Every family on its own ----------------------------------------------------------------------
# An encoder family's fine-tune comes from a tiny recipe job whose validation file is the test set,
# and is expected to score what that job measured at step 0 (the base) and at its end. A causal
# family's recipe job takes tens of seconds on two cores (its baseline's sample replies, the
# forgetting probe), so make test scores a made-up fine-tune (LoRA adapter, or a whole model with
# its weights moved) against the recipe's own functions on the same models, and the recipe jobs
# run in make test-long.


def test_every_family_is_evaluated_and_an_unknown_task_is_refused():
    assert set(EVALUATORS) == set(FAMILIES)
    with pytest.raises(SpecError, match="task"):
        EvalSpec(task="poetry", dataset_path="", output_dir="", models=[])


def test_a_test_set_is_read_by_the_recipes_reader_which_names_the_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"query": "q", "document": "d", "relevance": 1}\n{"query": "q", "document": "e"}\n')
    with pytest.raises(UserError, match="Line 2 of the test set: relevance"):
        EVALUATORS["rerank"].read(path)
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(UserError, match="Line 1 of the test set needs text fields prompt"):
        EVALUATORS["dpo"].read(path)


def recipe_job(folder: Path, base: Path, task: str, rows: list[dict], test_rows: list[dict], **settings) -> dict:
    """A tiny `task` job trained on `rows`, evaluated on `test_rows` (its validation file) at step 0
    and at the end only: its spec, its fine-tune, the test set, and what it measured."""
    from importlib import import_module

    test = write_jsonl(folder / "test.jsonl", test_rows)
    spec = TrainSpec(base_model=str(base), task=task, dataset_path=str(write_jsonl(folder / "train.jsonl", rows)),
                     validation_path=str(test), output_dir=str(folder / "job"), eval_every=100, **settings)
    result = import_module(f"worker.recipes.{task}").run(spec, Reporter())
    return {"spec": spec, "fine_tune": result["artifact_dir"], "test": test,
            "expected": (result["metrics_before"], result["metrics_after"])}


def made_up_job(folder: Path, base: Path, task: str, test_rows: list[dict], fine_tune: Path, measure, **settings):
    """A `task` job of `base` whose fine-tune is `fine_tune`, and what measure(model, reference,
    tokenizer) (the recipe's own functions) makes of the base (its own reference) and of it."""
    from peft import PeftModel

    from worker.models import load_causal_lm

    spec = TrainSpec(base_model=str(base), task=task, dataset_path="", output_dir=str(folder), **settings)
    base_model, tokenizer = load_causal_lm(spec)
    if (fine_tune / "adapter_config.json").is_file():
        tuned = PeftModel.from_pretrained(load_causal_lm(spec)[0], fine_tune)
    else:
        tuned = load_causal_lm(TrainSpec(**{**asdict(spec), "base_model": str(fine_tune)}))[0]
    expected = (measure(base_model, base_model, tokenizer), measure(tuned, base_model, tokenizer))
    return {"spec": spec, "fine_tune": str(fine_tune), "test": write_jsonl(folder / "test.jsonl", test_rows),
            "expected": expected}


def evaluate(job: dict, folder: Path, models: list[EvalModel] | None = None) -> dict:
    """worker.evaluation of `models` (by default the job's base and its fine-tune) on the job's test
    set; the result with its per-row records and its CSV table."""
    from worker.evaluation import run

    spec = job["spec"]
    eval_spec = EvalSpec(task=spec.task, dataset_path=str(job["test"]), output_dir=str(folder),
                         models=models or base_and_fine_tune(job), batch_size=spec.batch_size,
                         max_seq_length=spec.max_seq_length)
    result = run(eval_spec, Reporter())
    return {**result, "records": json.loads(Path(result["rows_json"]).read_text()),
            "table": list(csv.DictReader(io.StringIO(Path(result["rows_csv"]).read_text())))}


def base_and_fine_tune(job: dict) -> list[EvalModel]:
    spec = asdict(job["spec"])
    return [EvalModel("Base model", spec), EvalModel("Job 1: tuned", spec, job["fine_tune"], 1)]


@pytest.fixture(scope="module")
def rerank_job(tiny_bert_dir, tmp_path_factory):
    rows = marker_rows(queries=24, documents=5)
    return recipe_job(tmp_path_factory.mktemp("rerank"), tiny_bert_dir, "rerank", rows[:90], rows[90:],
                      method="full", learning_rate=3e-3, max_steps=3, batch_size=4, max_seq_length=32)


@pytest.fixture(scope="module")
def embed_job(tiny_bert_dir, tmp_path_factory):
    rows = tag_rows()
    return recipe_job(tmp_path_factory.mktemp("embed"), tiny_bert_dir, "embed", rows[:96], rows[96:],
                      method="full", learning_rate=1e-3, max_steps=3, batch_size=16, max_seq_length=32)


@pytest.fixture(scope="module")
def causal_fine_tunes(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Fine-tunes of the tiny llama that differ from it: a LoRA adapter (its B matrices set) and a
    whole model (its weights moved)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("causal-fine-tunes")
    torch.manual_seed(1)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(folder / "lora")
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for parameter in whole.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    whole.save_pretrained(folder / "full")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder / "full")
    return {"lora": folder / "lora", "full": folder / "full"}


@pytest.fixture(scope="module")
def domain_model(tiny_llama_dir, causal_fine_tunes, tmp_path_factory):
    from worker.recipes import domain

    documents = domain_samples.rows()[9:12]

    def measure(model, reference, tokenizer):
        packed = domain.pack(domain.tokenize(documents, tokenizer), 32, tokenizer.pad_token_id)
        return domain.held_out_loss(model, packed, len(documents), 4).metrics

    return made_up_job(tmp_path_factory.mktemp("domain-model"), tiny_llama_dir, "domain", documents,
                       causal_fine_tunes["lora"], measure, method="lora", batch_size=4, max_seq_length=32)


@pytest.fixture(scope="module")
def dpo_model(tiny_llama_dir, causal_fine_tunes, tmp_path_factory):
    """A LoRA fine-tune: its reference is the base, its adapters switched off."""
    from worker import preference
    from worker.recipes import dpo

    rows = preference_rows(24)[16:20]

    def measure(model, reference, tokenizer):
        pairs = [dpo.tokenize_pair(row, tokenizer) for row in rows]
        answers = [(ids["prompt"], (ids["chosen"], ids["rejected"])) for ids in pairs]
        scores = [preference.score(network, answers, 64) for network in (model, reference)]
        return dpo.preference_metrics(*scores, beta=0.1)

    return made_up_job(tmp_path_factory.mktemp("dpo-model"), tiny_llama_dir, "dpo", rows, causal_fine_tunes["lora"],
                       measure, method="lora", batch_size=8, max_seq_length=64)


@pytest.fixture(scope="module")
def kto_model(tiny_llama_dir, causal_fine_tunes, tmp_path_factory):
    """A full fine-tune: its reference is the base, loaded on its own."""
    import torch

    from worker.recipes import kto

    rows = feedback_rows(24)[16:20]
    labelled = [kto.read_label(row, "") for row in rows]

    def measure(model, reference, tokenizer):
        held_out = [(row, kto.tokenize_row(row, tokenizer)) for row in labelled]
        spec = TrainSpec(base_model=str(tiny_llama_dir), task="kto", dataset_path="", output_dir="", max_seq_length=64)
        scores = [kto.Setup(spec, Reporter(), network, tokenizer, None, held_out).scores() for network in (model, reference)]
        desirable = torch.tensor([row["desirable"] for row in labelled])
        return kto.kto_metrics(*scores, desirable, beta=0.1)

    return made_up_job(tmp_path_factory.mktemp("kto-model"), tiny_llama_dir, "kto", rows, causal_fine_tunes["full"],
                       measure, method="full", batch_size=8, max_seq_length=64)


@pytest.fixture(scope="module")
def domain_job(tiny_llama_dir, tmp_path_factory):
    documents = domain_samples.rows()[:12]
    return recipe_job(tmp_path_factory.mktemp("domain"), tiny_llama_dir, "domain", documents[:9], documents[9:],
                      method="lora", learning_rate=2e-2, max_steps=2, batch_size=4, max_seq_length=32)


@pytest.fixture(scope="module")
def dpo_job(tiny_llama_dir, tmp_path_factory):
    rows = preference_rows(24)
    return recipe_job(tmp_path_factory.mktemp("dpo"), tiny_llama_dir, "dpo", rows[:16], rows[16:],
                      method="lora", learning_rate=2e-2, max_steps=2, batch_size=8, max_seq_length=64)


@pytest.fixture(scope="module")
def kto_job(tiny_llama_dir, tmp_path_factory):
    rows = feedback_rows(24)
    return recipe_job(tmp_path_factory.mktemp("kto"), tiny_llama_dir, "kto", rows[:16], rows[16:],
                      method="full", learning_rate=1e-3, max_steps=2, batch_size=8, max_seq_length=64)


RECIPE_RUNS = [pytest.param(name, marks=pytest.mark.long) for name in ("domain_job", "dpo_job", "kto_job")]
FAMILY_JOBS = ["rerank_job", "embed_job", "domain_model", "dpo_model", "kto_model", *RECIPE_RUNS]


@pytest.fixture(scope="module")
def evaluations(request, tmp_path_factory):
    """evaluated(name): the base and the fine-tune of the job fixture `name`, evaluated once."""
    done: dict[str, dict] = {}

    def evaluated(name: str) -> dict:
        if name not in done:
            done[name] = evaluate(request.getfixturevalue(name), tmp_path_factory.mktemp(f"evaluated-{name}"))
        return done[name]

    return evaluated


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_JOBS)
def test_the_base_and_the_fine_tune_score_what_the_recipe_measures_of_them(request, evaluations, name):
    """A recipe job's base: what it measured at step 0; its fine-tune: what it measured at the end."""
    job, evaluated = request.getfixturevalue(name), evaluations(name)
    base, tuned = (entry["metrics"] for entry in evaluated["leaderboard"])
    before, after = job["expected"]
    assert base and set(base) == set(tuned) <= set(before) and base != tuned
    assert base == pytest.approx({key: before[key] for key in base}, rel=1e-4, abs=1e-6)
    assert tuned == pytest.approx({key: after[key] for key in tuned}, rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_JOBS)
def test_every_row_has_each_models_output_and_score_and_the_change_between_them(request, evaluations, name):
    job, evaluated = request.getfixturevalue(name), evaluations(name)
    records, lower_is_better = evaluated["records"], evaluated["scored"]["lower_is_better"]
    assert len(records) == len(evaluated["table"]) == evaluated["rows"] == len(job["test"].read_text().splitlines())
    assert lower_is_better == (job["spec"].task == "domain")
    for record in records:
        base, tuned = (model["score"] for model in record["models"])
        assert all(model["output"] for model in record["models"])
        assert record["change"] == pytest.approx(base - tuned if lower_is_better else tuned - base)
    assert any(record["change"] for record in records)
    assert evaluated["table"][0]["Job 1: tuned: output"] == records[0]["models"][1]["output"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_JOBS[:5])
def test_a_fine_tune_against_itself_changes_no_row(request, name, tmp_path):
    job = request.getfixturevalue(name)
    tuned = base_and_fine_tune(job)[1]
    evaluated = evaluate(job, tmp_path, [tuned, EvalModel("Job 1 again", tuned.spec, tuned.final_dir, 1)])
    first, second = (entry["metrics"] for entry in evaluated["leaderboard"])
    assert first == second
    assert {record["change"] for record in evaluated["records"]} == {0}


@pytest.mark.slow
def test_a_rerankers_rows_show_its_score_and_rank_and_share_their_querys_ndcg(evaluations):
    from worker.recipes.rerank import ranking_metrics

    records, first = evaluations("rerank_job")["records"], marker_rows(24, 5)[90]
    assert records[0]["input"] == f"{first['query']} || {first['document']}"
    query = records[:5]  # the first test query's five documents
    tuned = [record["models"][1] for record in query]
    assert sorted(model["detail"] for model in tuned) == [f"rank {rank} of 5" for rank in range(1, 6)]
    rows = [{"query": "q", "relevance": float(record["reference"].split()[1])} for record in query]
    ndcg = ranking_metrics(rows, [-int(model["detail"].split()[1]) for model in tuned])["ndcg@10"]
    assert [model["score"] for model in tuned] == [ndcg] * 5


@pytest.mark.slow
def test_an_embedders_rows_show_the_top_document_and_the_rank_of_the_positive(embed_job, evaluations):
    test_rows = [json.loads(line) for line in embed_job["test"].read_text().splitlines()]
    corpus = {row["positive"] for row in test_rows} | {row["negative"] for row in test_rows}
    for record in evaluations("embed_job")["records"]:
        for model in record["models"]:
            assert model["output"] in corpus
            found = re.fullmatch(r"positive at rank (\d+)", model["detail"])
            assert model["score"] == (1 / int(found.group(1)) if found else 0)
            assert (model["output"] == record["reference"]) == (model["score"] == 1)


@pytest.mark.slow
def test_a_documents_score_is_its_loss_and_a_fall_in_loss_is_a_positive_change(evaluations):
    for record in evaluations("domain_model")["records"]:
        base, tuned = record["models"]
        assert base["output"] == f"perplexity {math.exp(base['score']):.4g}"
        assert record["change"] == pytest.approx(base["score"] - tuned["score"])


@pytest.mark.slow
def test_a_pairs_score_is_its_reward_margin_against_the_reference_which_the_base_is(evaluations):
    evaluated = evaluations("dpo_model")
    records, first = evaluated["records"], preference_rows(24)[16]
    assert records[0]["input"] == first["prompt"]
    assert records[0]["reference"] == f"chosen: {first['chosen']} · rejected: {first['rejected']}"
    assert {record["models"][0]["score"] for record in records} == {0}
    assert {model["output"] for r in records for model in r["models"]} <= {"prefers chosen", "prefers rejected"}
    preferred = sum(record["models"][1]["output"] == "prefers chosen" for record in records) / len(records)
    assert evaluated["leaderboard"][1]["metrics"]["preference_accuracy"] == preferred
    margins = [record["models"][1]["score"] for record in records]
    assert evaluated["leaderboard"][1]["metrics"]["reward_margin"] == pytest.approx(sum(margins) / len(margins))


@pytest.mark.slow
def test_a_completions_score_is_its_reward_signed_by_its_label(evaluations):
    evaluated = evaluations("kto_model")
    records = evaluated["records"]
    assert {record["models"][0]["score"] for record in records} == {0}
    assert {record["models"][0]["output"] for record in records} == {"as likely as under the reference"}
    tuned = [record["models"][1] for record in records]
    right = [1 if model["score"] > 0 else 0.5 if model["score"] == 0 else 0 for model in tuned]
    assert evaluated["leaderboard"][1]["metrics"]["sign_accuracy"] == pytest.approx(sum(right) / len(right))
    for record, model in zip(records, tuned, strict=True):
        desirable = record["reference"].startswith("desirable:")
        assert model["output"].startswith("more likely") == ((model["score"] > 0) == desirable)


# The pages ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_dataset_page_offers_to_evaluate_a_fine_tune_of_any_family(owner, owner_client, media_root):
    from webapp.datasets.models import Dataset
    from webapp.jobs.models import Job

    dataset = Dataset.objects.create(owner=owner, name="queries", original_name="q.jsonl", format="jsonl",
                                     task="rerank", status="ready", rows_ok=30)
    Job.objects.create(owner=owner, dataset=dataset, name="ranker", state="succeeded",
                       spec={"task": "rerank", "base_model": "all-minilm-l6-v2", "method": "full"})
    page = owner_client.get(f"/datasets/{dataset.id}/").content.decode()
    assert 'id="evaluate-form"' in page and "Job " in page and "ranker" in page


@pytest.mark.django_db
def test_the_rows_page_says_what_the_scores_are_and_shows_each_models_detail(owner, owner_client, media_root):
    from django.utils.html import escape

    from webapp.datasets.models import Dataset
    from webapp.jobs.models import Job

    dataset = Dataset.objects.create(owner=owner, name="q", original_name="q.jsonl", format="jsonl", task="embed")
    rows = media_root / "rows.json"
    media_root.mkdir(parents=True, exist_ok=True)
    rows.write_text(json.dumps([{"row": 1, "input": "reset password", "reference": "Open Settings", "change": 0.5,
                                 "models": [{"output": "Office hours", "score": 0.5, "detail": "positive at rank 2"},
                                            {"output": "Open Settings", "score": 1.0, "detail": "positive at rank 1"}]}]))
    scored = EVALUATORS["embed"].described
    evaluation = Job.objects.create(owner=owner, dataset=dataset, name="e", kind="evaluate", state="succeeded",
                                    spec={"task": "embed", "models": [], "base_model": "x"},
                                    result={"leaderboard": [{"label": "Base model", "job_id": None, "metrics": {}},
                                                            {"label": "Job 1: t", "job_id": None, "metrics": {}}],
                                            "rows_json": str(rows), "scored": scored})
    page = owner_client.get(f"/jobs/{evaluation.id}/rows/").content.decode()
    assert escape(scored["output"]) in page and escape(scored["score"]) in page and "higher is better" in page
    assert "positive at rank 2" in page and "positive at rank 1" in page
    assert escape(scored["score"]) in owner_client.get(f"/jobs/{evaluation.id}/").content.decode()


@pytest.mark.slow
def test_a_pair_whose_prompt_fills_the_length_is_skipped_as_in_training(dpo_model, tmp_path):
    rows = preference_rows(2)
    rows[0]["prompt"] = "word " * 100
    job = {**dpo_model, "test": write_jsonl(tmp_path / "test.jsonl", rows)}
    evaluated = evaluate(job, tmp_path / "out", base_and_fine_tune(job))
    skipped, scored = evaluated["records"]
    assert [model["score"] for model in skipped["models"]] == [None, None] and skipped["change"] is None
    assert skipped["models"][1]["output"] == "" and skipped["input"] == rows[0]["prompt"]
    assert scored["models"][0]["score"] == 0 and scored["change"] == scored["models"][1]["score"]


def test_a_kept_checkpoint_scores_on_the_test_set_what_its_evaluation_measured(tiny_bert_dir, tmp_path, monkeypatch):
    """A classifier's checkpoint kept for download (worker.snapshots), unpacked by the evaluation,
    scores on the job's own validation file what the job measured there at that step."""
    from worker import encoder_forgetting

    monkeypatch.setattr(encoder_forgetting, "BUDGET", 1e9)  # the meter at every evaluation, however slow
    from worker.recipes import classify

    rows = group_rows(120)
    test = write_jsonl(tmp_path / "test.jsonl", rows[90:])
    spec = TrainSpec(base_model=str(tiny_bert_dir), task="classify", output_dir=str(tmp_path / "job"),
                     dataset_path=str(write_jsonl(tmp_path / "train.jsonl", rows[:90])), validation_path=str(test),
                     method="full", learning_rate=5e-4, max_steps=6, eval_every=2, batch_size=8, max_seq_length=32)
    result = classify.run(spec, reporter := Reporter())
    job = {"spec": spec, "test": test}
    kept = [entry for entry in result["checkpoints"] if not entry["final"]]
    assert kept, result["checkpoints"]
    measured = {e["step"]: e for e in reporter.events if e["kind"] == "eval" and not e.get("baseline")}
    spec = asdict(job["spec"])
    models = [EvalModel(f"Job 1: tuned · step {e['step']}", spec, checkpoint_zip=e["zip"], job_id=1, step=e["step"])
              for e in kept]
    evaluated = evaluate(job, tmp_path / "evaluation", [EvalModel("Job 1: tuned", spec, result["artifact_dir"], 1),
                                                        *models])
    board = evaluated["leaderboard"]
    assert [entry["step"] for entry in board] == [None, *(e["step"] for e in kept)]
    for entry in board[1:]:
        assert entry["metrics"]["accuracy"] == pytest.approx(measured[entry["step"]]["accuracy"])
        assert entry["metrics"]["eval_loss"] == pytest.approx(measured[entry["step"]]["eval_loss"], rel=1e-4)
    assert board[0]["metrics"]["eval_loss"] == pytest.approx(result["metrics_after"]["eval_loss"], rel=1e-4)


def test_a_checkpoint_whose_zip_is_gone_is_named(tmp_path):
    from worker.evaluation import unpacked

    gone = EvalModel("Job 3: tuned · step 8", {}, checkpoint_zip=str(tmp_path / "nothing.zip"), step=8)
    with pytest.raises(UserError, match="Job 3: tuned · step 8: the checkpoint is no longer there"):
        unpacked(gone, tmp_path / "into")
