"""`python -m bench.forgetting` (`make bench-forgetting`): what fine-tuning bought, and what it cost.

The real recipes (worker.recipes.<task>.run(spec, reporter), in this process, one after the other)
on the shipped sample data (webapp/datasets/samples/), each with the family's suggested settings
(worker.families) but for the method, the learning rate and replay; one seed, each run short:

- classification (which tool a request needs, 300 rows), all-MiniLM-L6-v2, 60 steps of batch 16:
  LoRA, full and head-only. Forgetting: worker.encoder_forgetting's 1 - Spearman rho of the base's
  and the tuned encoder's similarities on general sentence pairs, here at every evaluation;
- instruction tuning (query rewriting, 300 rows), SmolLM2-135M-Instruct, 30 steps of batch 8: LoRA
  (all linear layers, rank 16) and full fine-tunes. Forgetting: worker.forgetting's mean KL to the
  base's next-token distributions on the general probe, beside the probe's perplexity and the
  general prompts' answers before and after;
- replay: some of those instruction-tuning runs again with replay_fraction 0.25 (a quarter of the
  training rows general text, worker.forgetting.replay_rows), the same steps.

Each method runs at its suggested learning rate and one more (LEARNING_RATES), so that LoRA and full
runs reach about the same task gain; every run evaluates often enough to draw a curve of held-out
loss against forgetting. Two runs are compared at equal task gain: at the held-out loss both
reached (the higher of their final ones), each one's forgetting where its curve first reached it,
linear between evaluations.

Prints the CPU (AVX512-BF16 / AMX: whether the runs train in bf16) and a table per part, and writes
everything to var/bench/forgetting.json (after every run, so an interrupted bench keeps what it
measured). docs/performance.md, "Forgetting: LoRA vs full fine-tune", says what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import import_module, metadata
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from webapp.datasets.samples import sample_rows
from worker.encoder_forgetting import ForgettingMeter
from worker.events import Reporter
from worker.families import FAMILIES
from worker.hardware import bf16_supported
from worker.models import REPO_ROOT
from worker.spec import ALL_LINEAR, TrainSpec

WORK_DIR = REPO_ROOT / "var" / "bench"
RESULTS = WORK_DIR / "forgetting.json"
SEED = 42
EVAL_EVERY = {"sft": 5, "classify": 10}
"""Evaluations (held-out metrics and forgetting) every this many steps: the points of each curve."""
REPLAY = 0.25
LEARNING_RATES = {
    "sft": {"lora": (2e-3, 5e-4), "full": (5e-5, 2e-4)},
    "classify": {"lora": (1e-3, 3e-4), "full": (1e-4, 3e-5), "head": (5e-3,)},
}
"""Each method's suggested learning rate (worker.families, first) and one that learns less (LoRA) or
more (full) in the same steps, so that some LoRA and full runs reach about the same task gain."""
REPLAYED = (("lora", 2e-3), ("full", 5e-5), ("full", 2e-4))
"""The instruction-tuning runs repeated with replay: the suggested LoRA and full fine-tunes, and the
full fine-tune that forgets most."""


@dataclass(frozen=True)
class Run:
    """One fine-tune of the experiment."""

    part: str
    """"sft", "replay" or "classify": the table it belongs to."""
    task: str
    method: str
    learning_rate: float
    replay_fraction: float = 0.0

    @property
    def name(self) -> str:
        replay = f" + replay {self.replay_fraction:g}" if self.replay_fraction else ""
        return f"{self.method} lr {self.learning_rate:g}{replay}"


def plan() -> list[Run]:
    """Every run, in the order they run: each task's methods at LEARNING_RATES (the short
    classification runs first), then the REPLAYED runs with replay."""
    runs = [
        Run(task, task, method, rate)
        for task in ("classify", "sft")
        for method, rates in LEARNING_RATES[task].items()
        for rate in rates
    ]
    return runs + [Run("replay", "sft", method, rate, REPLAY) for method, rate in REPLAYED]


# One run ------------------------------------------------------------------------------------


def spec_for(run: Run, data: Path, output_dir: str, seed: int) -> TrainSpec:
    """The family's suggested settings with the run's method, learning rate and replay."""
    suggested = FAMILIES[run.task].suggested
    return TrainSpec(
        base_model=suggested.base_model,
        task=run.task,
        method=run.method,
        learning_rate=run.learning_rate,
        replay_fraction=run.replay_fraction,
        max_steps=suggested.max_steps,
        batch_size=suggested.batch_size,
        max_seq_length=suggested.max_seq_length,
        # An encoder's layers are not llama's: the new-job form adapts every linear layer.
        **({"lora_target_modules": [ALL_LINEAR]} if run.task != "sft" else {}),
        eval_every=EVAL_EVERY[run.task],
        checkpoint_every=1000,  # no resumable checkpoints inside these short runs
        seed=seed,
        dataset_path=str(data),
        output_dir=output_dir,
    )


def train(run: Run, data: Path, seed: int) -> dict[str, Any]:
    """The recipe's result and its eval events, with the run's wall time."""
    recipe = import_module(FAMILIES[run.task].recipe)
    # The encoder meter measures during training only while it stays within 5 % of the job's time:
    # here it measures at every evaluation, so that each run has a curve too (training is the same).
    every_evaluation = patch.object(ForgettingMeter, "if_affordable", ForgettingMeter.__call__)
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as output_dir, every_evaluation:
        spec = spec_for(run, data, output_dir, seed)
        started = time.perf_counter()
        with Reporter() as reporter:
            result = recipe.run(spec, reporter)
        wall = time.perf_counter() - started
    params = next(event for event in reporter.events if event["kind"] == "params")
    evals = [event for event in reporter.events if event["kind"] == "eval"]
    return {
        "run": asdict(run) | {"name": run.name},
        "spec": {key: value for key, value in spec.to_dict().items() if key not in ("dataset_path", "output_dir")},
        "wall_s": wall,
        "trainable": params["trainable"],
        "total": params["total"],
        "metrics_before": result["metrics_before"],
        "metrics_after": result["metrics_after"],
        "curve": [curve_point(event) for event in sorted(evals, key=lambda event: event["step"])],
        "general_answers": result.get("general_answers", []),
        "task_format": task_format(data) if run.task == "sft" else "",
    }


def task_format(data: Path) -> str:
    """What every response of the training rows starts with ("search:" for the sample rewrites)."""
    responses = [json.loads(line)["response"] for line in data.read_text().splitlines()]
    return os.path.commonprefix(responses).strip()


CURVE_KEYS = ("eval_loss", "accuracy", "forgetting", "general_perplexity")


def curve_point(event: dict[str, Any]) -> dict[str, Any]:
    return {"step": event["step"]} | {key: event[key] for key in CURVE_KEYS if key in event}


# The comparisons ----------------------------------------------------------------------------


def summary(measured: dict[str, Any]) -> dict[str, Any]:
    """What a table row shows of one run."""
    before, after = measured["metrics_before"], measured["metrics_after"]
    row = {
        "name": measured["run"]["name"],
        "eval_loss": [before["eval_loss"], after["eval_loss"]],
        "forgetting": after["forgetting"],
        "trainable_share": measured["trainable"] / measured["total"],
        "wall_s": measured["wall_s"],
    }
    if "accuracy" in before:
        row["accuracy"] = [before["accuracy"], after["accuracy"]]
    if "general_perplexity" in before:
        row["general_perplexity"] = [before["general_perplexity"], after["general_perplexity"]]
    answers, format_ = measured["general_answers"], measured["task_format"]
    if answers and format_:
        # A general prompt answered in the task's format: the specialist has taken over the chat.
        row["general_answers_in_task_format"] = [sum(a["after"].startswith(format_) for a in answers), len(answers)]
    return row


def forgetting_at(curve: list[dict[str, Any]], eval_loss: float) -> dict[str, float] | None:
    """Where a run's curve first reaches `eval_loss`: the step, the forgetting and (causal LMs) the
    general perplexity there, linear between the two evaluations around it; None if it never gets
    that low."""
    for earlier, later in zip(curve, curve[1:], strict=False):
        if later["eval_loss"] <= eval_loss < earlier["eval_loss"]:
            share = (earlier["eval_loss"] - eval_loss) / (earlier["eval_loss"] - later["eval_loss"])
            keys = [key for key in ("step", "forgetting", "general_perplexity") if key in earlier and key in later]
            return {key: earlier[key] + share * (later[key] - earlier[key]) for key in keys}
    return None


def at_equal_gain(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two runs compared at the same task gain: the held-out loss both reach (the higher of their
    final ones) and each one's forgetting where its curve first reaches it."""
    target = max(first["metrics_after"]["eval_loss"], second["metrics_after"]["eval_loss"])
    return {
        "eval_loss": target,
        "runs": {run["run"]["name"]: forgetting_at(run["curve"], target) for run in (first, second)},
    }


def equal_gain_pairs(runs: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """Every pair of different methods in `part`, at equal task gain."""
    chosen = [run for run in runs if run["run"]["part"] == part]
    return [
        at_equal_gain(first, second)
        for i, first in enumerate(chosen)
        for second in chosen[i + 1 :]
        if first["run"]["method"] != second["run"]["method"]
    ]


def replay_pairs(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(the run without replay, the same method and learning rate with replay)."""

    def setting(run: dict[str, Any]) -> tuple[str, float]:
        return run["run"]["method"], run["run"]["learning_rate"]

    without = {setting(run): run for run in runs if run["run"]["part"] == "sft"}
    return [(without[setting(run)], run) for run in runs if run["run"]["part"] == "replay" and setting(run) in without]


# Printing -----------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}:")
    for row in rows:
        parts = [f"  {row['name']:<28}", "eval loss {:.3f} -> {:.3f}".format(*row["eval_loss"])]
        if "accuracy" in row:
            parts.append("accuracy {:.3f} -> {:.3f}".format(*row["accuracy"]))
        parts.append(f"forgetting {row['forgetting']:.4f}")
        if "general_perplexity" in row:
            parts.append("general perplexity {:.2f} -> {:.2f}".format(*row["general_perplexity"]))
        if "general_answers_in_task_format" in row:
            parts.append("general answers in the task's format {}/{}".format(*row["general_answers_in_task_format"]))
        parts.append(f"(trains {row['trainable_share']:.2%} of the weights, {row['wall_s']:.0f} s)")
        print("  ".join(parts))


def print_pairs(pairs: list[dict[str, Any]]) -> None:
    for pair in pairs:
        sides = []
        for name, point in pair["runs"].items():
            if point is None:
                sides.append(f"{name}: not reached")
                continue
            perplexity = (
                f", general perplexity {point['general_perplexity']:.2f}" if "general_perplexity" in point else ""
            )
            sides.append(f"{name}: step {point['step']:.1f}, forgetting {point['forgetting']:.4f}{perplexity}")
        print(f"  at eval loss {pair['eval_loss']:.3f}: " + " | ".join(sides))


def environment() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": bool({"amx_bf16", "amx_tile"} & flags),
        "bf16_training": bf16_supported(),
        "threads": torch.get_num_threads(),
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "peft")},
        "load_average_at_start": os.getloadavg(),
    }


# Main ---------------------------------------------------------------------------------------


def write_samples() -> dict[str, Path]:
    """Each task's sample rows as the JSONL a job trains on."""
    folder = WORK_DIR / "forgetting-data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {task: folder / f"{task}.jsonl" for task in ("sft", "classify")}
    for task, path in paths.items():
        path.write_text("".join(json.dumps(row) + "\n" for row in sample_rows(task)))
    return paths


PARTS = ("sft", "classify", "replay")
TITLES = {
    "sft": "instruction tuning, SmolLM2-135M-Instruct, 30 steps of batch 8",
    "classify": "classification, all-MiniLM-L6-v2, 60 steps of batch 16",
    "replay": f"replay {REPLAY:g} against none, instruction tuning, the same 30 steps",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.forgetting", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED, help="the runs' seed (split, initialisation, order)")
    parser.add_argument(
        "--only",
        choices=PARTS,
        action="append",
        help="run only this part (repeatable; replay's comparison needs sft's runs too)",
    )
    args = parser.parse_args(argv)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(
        f"CPU: {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads; "
        f"avx512_bf16: {'yes' if env['avx512_bf16'] else 'no'}, AMX: {'yes' if env['amx'] else 'no'}, "
        f"so the runs train in {'bf16' if env['bf16_training'] else 'fp32'}; "
        f"load average {env['load_average_at_start'][0]:.2f}"
    )
    if env["load_average_at_start"][0] > 0.5:
        print("warning: the machine is busy; the wall times below include other processes' share of it")
    started = time.perf_counter()
    output = RESULTS if args.seed == SEED else RESULTS.with_name(f"forgetting-seed{args.seed}.json")
    data = write_samples()
    runs = []
    for run in plan():
        if args.only and run.part not in args.only:
            continue
        print(f"{run.task}: {run.name} ...", flush=True)
        runs.append(train(run, data[run.task], args.seed))
        # Written after every run: an interrupted bench keeps what it measured.
        results = {"environment": env, "seed": args.seed, **compare(runs), "runs": runs}
        output.write_text(json.dumps(results | {"wall_s": time.perf_counter() - started}, indent=2) + "\n")
    results = compare(runs)
    for part in ("sft", "classify"):
        if part in results:
            print_table(TITLES[part], results[part]["runs"])
            print_pairs(results[part]["equal_gain"])
    if "replay" in results:
        print_table(TITLES["replay"], results["replay"]["runs"])
        print_pairs(results["replay"]["equal_gain"])
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes; results in {output}")
    return 0


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The tables of the runs so far: each task's runs and their pairs at equal gain, and replay."""
    results: dict[str, Any] = {}
    for part in ("sft", "classify"):
        rows = [summary(run) for run in runs if run["run"]["part"] == part]
        if rows:
            results[part] = {"runs": rows, "equal_gain": equal_gain_pairs(runs, part)}
    pairs = replay_pairs(runs)
    if pairs:
        results["replay"] = {
            "runs": [summary(run) for pair in pairs for run in pair],
            "equal_gain": [at_equal_gain(*pair) for pair in pairs],
        }
    return results


if __name__ == "__main__":
    raise SystemExit(main())
