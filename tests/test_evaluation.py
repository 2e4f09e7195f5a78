"""Evaluation on your own test set: through the real stack (two classifiers trained by the worker,
an uploaded test set, an evaluation job over the base and both), the leaderboard and the per-row
CSV, and the same accuracy from the downloaded artifact in a fresh process; the per-row files
safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.test_classify_recipe import group_rows
from worker.evaluation import row_records, spreadsheet_safe
from worker.spec import EvalModel, EvalSpec

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
