"""Every task type through the real stack: upload its data → the new-job form → the Celery
worker → a held-out metric that beats the untouched base (step 0) by a clear margin → the
download, which is the worker's artifact byte for byte and loads with the library a user would
use, in a fresh process.

Tiny models learn trivially learnable patterns (the same ones the recipe tests use, where each
artifact's predictions are also compared with the worker's final evaluation)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.model_fixtures import write_jsonl
from tests.support.stack import states
from tests.test_classify_recipe import both_fruit_rows, group_rows
from tests.test_conversations import tool_rows
from tests.test_dpo_recipe import preference_rows
from tests.test_embed_recipe import tag_rows
from tests.test_kto_recipe import feedback_rows
from tests.test_rerank_recipe import marker_rows
from webapp.datasets.samples import domain as domain_samples

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    rows: list[dict]
    base: str
    """The model fixture the job fine-tunes."""
    metric: str
    """The held-out metric that shows the task was learnt."""
    before_at_most: float
    after_at_least: float
    form: dict = field(default_factory=dict)
    """New-job form values (the dataset sets the task)."""
    task: str = ""
    """The dataset's task when the case's name is not one."""
    primary: str = ""
    """The recipe's primary metric when it is not `metric`."""
    also: dict = field(default_factory=dict)
    """Other held-out metrics the tuned model must reach (name: at least)."""


CASES = {
    # Held-out rows never share a text with training rows (the split groups inputs): the tiny
    # classifiers train long enough to generalise to new word combinations (test_classify_recipe).
    "classify": Case(group_rows(), "tiny_bert_dir", "accuracy", 0.5, 0.9,
                     dict(method="full", learning_rate=2e-2, max_steps=40, batch_size=16, max_seq_length=32)),
    "pair": Case(both_fruit_rows(), "tiny_bert_dir", "accuracy", 0.65, 0.9,
                 dict(method="full", learning_rate=2e-2, max_steps=40, batch_size=16, max_seq_length=32)),
    "rerank": Case(marker_rows(), "tiny_bert_dir", "ndcg@10", 0.7, 0.9,
                   dict(method="full", learning_rate=3e-3, max_steps=20, batch_size=4, max_seq_length=64,
                        validation_fraction=0.25)),
    "embed": Case(tag_rows(), "tiny_bert_dir", "recall@1", 0.6, 0.9,
                  dict(method="full", learning_rate=1e-3, max_steps=20, batch_size=16, max_seq_length=32,
                       validation_fraction=0.25)),
    "dpo": Case(preference_rows(), "tiny_llama_dir", "preference_accuracy", 0.7, 0.9,
                dict(method="lora", learning_rate=2e-2, max_steps=8, batch_size=8, max_seq_length=64,
                     validation_fraction=0.25)),
    "kto": Case(feedback_rows(), "tiny_llama_dir", "sign_accuracy", 0.5, 0.85,
                dict(method="lora", learning_rate=2e-2, max_steps=8, batch_size=8, max_seq_length=64,
                     validation_fraction=0.25)),
    # Tool selection: the called tool's name, exact match on held-out requests (unseen wordings
    # of the four asks; only the wording tells the tool), base vs tuned.
    "tools": Case(tool_rows(96), "tiny_llama_dir", "tool_name_accuracy", 0.5, 0.9,
                  dict(method="full", learning_rate=3e-3, max_steps=100, batch_size=8, max_seq_length=256,
                       validation_fraction=0.2), task="sft", primary="eval_loss",
                  also={"tool_arguments_accuracy": 0.9}),
    # Domain adaptation: held-out documents' perplexity, lower is better (checked as its inverse).
    "domain": Case(domain_samples.rows()[:40], "tiny_llama_dir", "perplexity", 0, 0,
                   dict(method="lora", learning_rate=2e-2, max_steps=8, batch_size=4, max_seq_length=32,
                        validation_fraction=0.1)),
}
LEARNING = {"tools", "domain", "kto"}
"""Cases that train until learnt: in `make test-long` with the other `learning` tests (KTO's
recipe tests are there too; DPO's case stands for the preference families in `make test`)."""

# One fresh process loads each downloaded artifact the way the model card says to.
LOAD = """
import json, sys
task, folder, base = sys.argv[1:4]
if task in ("classify", "pair"):
    from transformers import pipeline
    out = pipeline("text-classification", model=folder)({"text": "apple", "text_pair": "pear"} if task == "pair" else "apple banana")
elif task == "rerank":
    from sentence_transformers import CrossEncoder
    out = CrossEncoder(folder).predict([("question", "cat dog apple")]).tolist()
elif task == "embed":
    from sentence_transformers import SentenceTransformer
    out = SentenceTransformer(folder).encode(["fruit alpha"]).shape
else:
    from pathlib import Path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    if (Path(folder) / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        out = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    else:
        out = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
print(json.dumps({"loaded": str(out)}))
"""


@pytest.fixture(scope="module")
def user(stack):
    stack.create_user("tasks")
    return stack.session("tasks")


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.learning] if name in LEARNING else [])
                                  for name in CASES])
def test_each_task_trains_through_the_worker_beats_its_baseline_and_downloads(name, stack, user, request, tmp_path):
    case = CASES[name]
    task = case.task or name
    base_dir = request.getfixturevalue(case.base)
    data = write_jsonl(tmp_path / f"{name}.jsonl", case.rows)
    job_id = stack.submit_job(user, stack.upload_dataset(user, data, task=task), base_dir, **case.form)

    job = stack.wait_for(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=600)
    assert job["state"] == "succeeded", (job["message"], stack.log_tail("worker"))
    assert states(job)[-1] == "succeeded" and job["attempts"] == 1

    result = job["result"]
    assert result["primary_metric"] == (case.primary or case.metric)
    before, after = result["metrics_before"][case.metric], result["metrics_after"][case.metric]
    if case.metric == "perplexity":
        assert after < before / 4, (before, after)
    else:
        assert before <= case.before_at_most and after >= case.after_at_least, (before, after)
        assert after >= before + 0.2
    for metric, at_least in case.also.items():
        assert result["metrics_after"][metric] >= at_least, (metric, result["metrics_after"])
    evals = [e for e in job["events"] if e["kind"] == "eval"]
    assert evals[0].get("baseline") and evals[0]["step"] == 0 and evals[-1].get("final")

    page = user.get(f"{stack.base_url}/jobs/{job_id}/").text
    assert "succeeded" in page and f"/jobs/{job_id}/download/" in page

    reply = user.get(f"{stack.base_url}/jobs/{job_id}/download/")
    assert reply.status_code == 200 and "attachment" in reply.headers["Content-Disposition"]
    folder = tmp_path / "download"
    zipfile.ZipFile(io.BytesIO(reply.content)).extractall(folder)
    folder = next(p.parent for p in folder.rglob("train_spec.json"))
    artifact = Path(result["artifact_dir"])
    assert sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) == sorted(
        p.relative_to(artifact) for p in artifact.rglob("*") if p.is_file()
    )
    for path in artifact.rglob("*"):
        if path.is_file():
            assert (folder / path.relative_to(artifact)).read_bytes() == path.read_bytes(), path.name
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.rglob("*"))
    assert json.loads((folder / "train_spec.json").read_text())["task"] == task

    done = subprocess.run([sys.executable, "-c", LOAD, task, str(folder), str(base_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["loaded"]
