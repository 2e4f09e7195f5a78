"""What the preference recipe tests (DPO, KTO) share: a tiny run's spec and its events, the checks
every preference run passes (event order, artifacts, a stop request), and an adapter's scores of
completions recomputed in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.resume import StopAfter
from worker.errors import Cancelled
from worker.events import Reporter
from worker.spec import TrainSpec

TINY_RUN = dict(
    max_steps=8, batch_size=8, max_seq_length=64, eval_every=4, validation_fraction=0.25, learning_rate=2e-2
)


def make_spec(task: str, base: Path, data: Path, out: Path, **overrides) -> TrainSpec:
    """A short `task` run on the tiny llama: 8 steps, a quarter of the rows held out."""
    settings = dict(task=task, **TINY_RUN)
    return TrainSpec(base_model=str(base), dataset_path=str(data), output_dir=str(out), **(settings | overrides))


def train(run: Callable, spec: TrainSpec) -> dict:
    """The recipe's result, its events and its spec."""
    reporter = Reporter()
    result = run(spec, reporter)
    return {"result": result, "events": reporter.events, "spec": spec}


def evals(events: list[dict]) -> list[dict]:
    return [event for event in events if event["kind"] == "eval"]


def assert_reported_in_order(run: dict) -> list[dict]:
    """States, params, the baseline, 8 steps' metrics, evals at steps 0, 4 and 8 and the artifact, in
    that order, the final eval holding the result's metrics; the metric events, to check further."""
    events = run["events"]
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["preparing", "training", "evaluating", "exporting"]
    kinds = [event["kind"] for event in events]
    baseline_at = kinds.index("eval")
    assert kinds.index("log") < kinds.index("params") < baseline_at < kinds.index("metric") < kinds.index("artifact")
    assert events[baseline_at]["baseline"] is True and events[baseline_at + 1]["state"] == "training"
    metrics = [event for event in events if event["kind"] == "metric"]
    assert [event["step"] for event in metrics] == list(range(1, 9))
    held_out = evals(events)
    assert [event["step"] for event in held_out] == [0, 4, 8]
    assert held_out[-1]["final"] is True and "final" not in held_out[1]
    final = {key: held_out[-1][key] for key in run["result"]["metrics_after"]}
    assert final == run["result"]["metrics_after"]
    return metrics


def assert_samples_before_and_after(run: dict) -> list[dict]:
    """The final eval carries three samples (the result's), each with its replies before and after,
    some of them changed; the samples, to check further."""
    samples = evals(run["events"])[-1]["samples"]
    assert samples == run["result"]["samples"] and len(samples) == 3
    assert all(set(sample) == {"instruction", "reference", "before", "after"} for sample in samples)
    assert any(sample["before"] != sample["after"] for sample in samples)
    return samples


def adapter_card(run: dict) -> str:
    """The LoRA artifact's model card, after checking the folder holds only the trained adapter
    (with tokenizer and spec) and the card's loading code and no perplexity (meaningless here)."""
    artifact = Path(run["result"]["artifact_dir"])
    names = {path.name for path in artifact.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "train_spec.json",
        "README.md",
    } <= names
    assert "model.safetensors" not in names and "ref" not in names  # only the trained adapter
    assert TrainSpec.from_json((artifact / "train_spec.json").read_text()) == run["spec"]
    card = (artifact / "README.md").read_text()
    assert "perplexity" not in card
    assert f'PeftModel.from_pretrained(base, "specialist-job-{run["spec"].job_id}-adapter")' in card
    return card


def assert_full_model_artifact(run: dict) -> None:
    names = {path.name for path in Path(run["result"]["artifact_dir"]).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "adapter_config.json" not in names


def assert_a_stop_request_cancels(run: Callable, spec: TrainSpec) -> None:
    """A stop requested at step 2 ends training by step 3 with Cancelled, before anything is exported."""
    reporter = StopAfter(2)
    with pytest.raises(Cancelled):
        run(spec, reporter)
    assert max(event["step"] for event in reporter.events if event["kind"] == "metric") <= 3
    assert not (Path(spec.output_dir) / "final").exists()


def prompt_turns(row: dict) -> list[dict]:
    """A row's optional system turn and its user prompt, as chat messages."""
    turns = [{"role": "system", "content": row["system"]}] if "system" in row else []
    return turns + [{"role": "user", "content": row["prompt"]}]


SUMMED_LOGPS = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter_dir, completions_path = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

def completion_logp(messages, completion):
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], return_dict=False)
    assert full[: len(prompt)] == prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1]
    logps = logits.log_softmax(-1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    return logps[len(prompt) - 1 :].sum().item()

print(json.dumps([completion_logp(messages, completion) for messages, completion in json.load(open(completions_path))]))
"""


def fresh_process_logps(run: dict, completions: list[tuple[list[dict], str]]) -> list[float]:
    """The summed log-probability of each (messages, completion) given the messages, with the run's
    base and adapter loaded afresh in another process, as a user would load them."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as listed:
        json.dump(completions, listed)
        listed.flush()
        done = subprocess.run(
            [sys.executable, "-c", SUMMED_LOGPS, run["spec"].base_model, run["result"]["artifact_dir"], listed.name],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
