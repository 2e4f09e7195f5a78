"""Throughput benchmark: this app's SFT job path against the fine-tune a user would write by hand.

``make bench`` (``python -m bench.training``) trains SmolLM2-135M-Instruct on one generated
instruction dataset four times, each in its own process (so each peak RSS is its own):

- baseline: transformers Trainer (+ peft LoRA), fp32, every batch padded to MAX_LENGTH tokens;
- app: worker.recipes.sft.run(spec, reporter), the code the Celery worker runs;

for LoRA (r=8, alpha 16 on q_proj and v_proj) and for a full fine-tune (``--cuda``: on the GPU,
plus QLoRA against the same LoRA baseline). The app runs first and
its batches are recorded as they are built; the baseline then replays exactly those batches, so
both see the same rows in the same order and their losses compare step by step. The first
warm-up steps are left out of the timing. Results go to stdout and var/bench/results.json;
docs/performance.md says what the numbers mean. ``--cuda`` also appends them to that page, and
on a machine without CUDA says so and exits 0.

On the CPU it also times the forgetting probe (worker.forgetting) inside a default
instruction-tuning job (the family's suggested settings, with its evaluations): its share of the
job's time (``--only probe`` runs just that part).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from webapp.datasets.samples import domain as domain_samples
from worker import forgetting
from worker.events import Reporter
from worker.families import FAMILIES
from worker.hardware import bf16_supported
from worker.models import REPO_ROOT, resolve_base
from worker.recipes import domain, sft
from worker.spec import TrainSpec

WORK_DIR = REPO_ROOT / "var" / "bench"
BASE_MODEL = "smollm2-135m-instruct"
BATCH_SIZE = 8
MAX_LENGTH = 256
SEED = 42
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.05  # the dropout is TrainSpec's default
LORA_TARGETS = ["q_proj", "v_proj"]
LEARNING_RATES = {"lora": 2e-3, "qlora": 2e-3, "full": 5e-5}
FINAL_LOSS_STEPS = 4
"""The final loss is the mean over this many last steps (one batch alone is a noisy measure)."""
METHODS = ("lora", "full")
CUDA_METHODS = ("lora", "full", "qlora")  # QLoRA's baseline is the fp32 LoRA script
ROLES = ("app", "baseline")
PERFORMANCE_DOC = REPO_ROOT / "docs" / "performance.md"
# Both runs: OpenMP threads sleep instead of spinning while they wait (as `manage.py serve` starts the
# training worker), so that other processes on a shared machine distort the comparison less.
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class Plan:
    warmup_steps: int
    """Optimizer steps run before the clock starts (first calls build kernels and caches)."""
    timed_steps: int
    """Optimizer steps timed after the warm-up."""
    threads: int
    """Torch threads for every run (default: one per core, as the worker runs)."""

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def rows(self) -> int:
        # Exactly one epoch: every row is trained on once, in both runs.
        return self.steps * BATCH_SIZE


# Data ---------------------------------------------------------------------------------------

SYSTEM_PROMPT = "Be brief."  # without one, the chat template adds a 20-token default
WORDS = (  # noqa: SIM905 - a word list reads best as text
    "apple river stone cloud green table window music paper garden silver orange winter summer "
    "bright quiet forest candle bridge market yellow simple travel letter number circle friend "
    "island mountain pencil rabbit shadow spring thunder valley wonder basket butter castle "
    "copper dragon engine feather flower guitar hammer jacket kitten ladder lemon marble mirror "
    "needle ocean pepper planet pocket puzzle rocket saddle sugar tiger tomato tunnel velvet "
    "wagon whistle yogurt zebra anchor blanket cabin desert falcon glacier harbor meadow"
).split()
TASKS = {
    "Reverse the order of these words": lambda words: words[::-1],
    "Sort these words alphabetically": sorted,
    "Repeat these words": list,
    "Write these words in capital letters": lambda words: [word.upper() for word in words],
}


def generate_rows(count: int, tokenizer, seed: int = SEED) -> list[dict[str, str]]:
    """`count` instruction rows whose rendered lengths follow a log-normal around 100 tokens,
    from the chat template's floor (~25 tokens) up to MAX_LENGTH; the same rows for a seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        target = min(MAX_LENGTH, round(rng.lognormvariate(math.log(88), 0.5)))
        instruction, transform = rng.choice(list(TASKS.items()))
        words = [rng.choice(WORDS) for _ in range(MAX_LENGTH)]
        rows.append(_longest_row_within(target, instruction, transform, words, tokenizer))
    return rows


def _longest_row_within(target: int, instruction: str, transform, words: list[str], tokenizer) -> dict[str, str]:
    def row(n: int) -> dict[str, str]:
        chosen = words[:n]
        return {
            "system": SYSTEM_PROMPT,
            "instruction": f"{instruction}: {' '.join(chosen)}",
            "response": " ".join(transform(chosen)),
        }

    def length(n: int) -> int:
        # One token of headroom, so that a row longer than MAX_LENGTH shows as longer.
        return len(sft.tokenize_example(row(n), tokenizer, MAX_LENGTH + 1)["input_ids"])

    low, high = 1, len(words) // 2  # the rendered length grows with n: bisect for the target
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= target else (low, middle - 1)
    return row(low)


def tokenize(row: dict[str, str], tokenizer) -> dict[str, list[int]]:
    """The app's own rendering (chat template, loss on the response only)."""
    return sft.tokenize_example(row, tokenizer, MAX_LENGTH)


# The two runs (each in its own process) --------------------------------------------------------


class TimedReporter(Reporter):
    """The Reporter, plus what each emit call costs the training thread."""

    def __init__(self, sink):
        super().__init__(sink=sink)
        self.emit_seconds: list[tuple[str, int, float]] = []

    def emit(self, kind: str, step: int = 0, **data: Any) -> None:
        started = time.perf_counter()
        super().emit(kind, step, **data)
        self.emit_seconds.append((kind, step, time.perf_counter() - started))


class StepClock(TrainerCallback):
    """When training began, and when each step's loss was logged (as the app's metric events)."""

    def __init__(self):
        self.started = 0.0
        self.logged: dict[int, tuple[float, float]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged[state.global_step] = (time.time(), float(logs["loss"]))


def run_app(method: str, plan: Plan) -> dict[str, Any]:
    """worker.recipes.sft.run as the worker runs it; timings from its own events."""
    # Record each batch as the recipe builds it; the baseline replays them. The recipe looks
    # pad_batch up when it builds its Trainer, so this wrapper is what its Trainer calls.
    batches: list[list[list[int]]] = []
    pad_batch = sft.pad_batch

    def recording_pad_batch(features, pad_id):
        batches.append([feature["input_ids"] for feature in features])
        return pad_batch(features, pad_id)

    sft.pad_batch = recording_pad_batch
    delivered: list[str] = []  # the worker's sink writes each event to the database and Redis
    reporter = TimedReporter(sink=lambda events: delivered.extend(json.dumps(event) for event in events))
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as output_dir:
        spec = TrainSpec(
            base_model=BASE_MODEL,
            dataset_path=str(WORK_DIR / "data.jsonl"),
            output_dir=output_dir,
            method=method,
            lora_r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            lora_target_modules=LORA_TARGETS,
            learning_rate=LEARNING_RATES[method],
            max_steps=plan.steps,
            batch_size=BATCH_SIZE,
            max_seq_length=MAX_LENGTH,
            validation_fraction=0.0,  # no evaluation inside the timed window
            seed=SEED,
        )
        started = time.time()
        with reporter:
            sft.run(spec, reporter)
    events = reporter.events
    training = next(e["t"] for e in events if e["kind"] == "state" and e["state"] == "training")
    metrics = {e["step"]: e for e in events if e["kind"] == "metric"}
    exported = next(e["t"] for e in events if e["kind"] == "artifact")
    emits = [seconds for kind, step, seconds in reporter.emit_seconds if kind == "metric" and step > plan.warmup_steps]
    return {
        "batches": batches[: plan.steps],
        "bf16": bf16_supported(),
        "logged_at": {step: metrics[step]["t"] for step in metrics},
        "losses": {step: metrics[step]["loss"] for step in metrics},
        "train_started_at": training,
        "setup_s": training - started,
        "export_s": exported - metrics[plan.steps]["t"],
        "emit_s": sum(emits),
        "emit_max_s": max(emits, default=0.0),
        "emit_calls": len(emits),
        "events_delivered": len(delivered),
    }


def run_baseline(method: str, plan: Plan) -> dict[str, Any]:
    """The fine-tune a user writes by hand: Trainer, fp32, every batch padded to MAX_LENGTH."""
    started = time.time()
    set_seed(SEED)
    path = resolve_base(BASE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    rows = [json.loads(line) for line in (WORK_DIR / "data.jsonl").read_text().splitlines()]
    examples = {tuple(e["input_ids"]): e for e in (tokenize(row, tokenizer) for row in rows)}
    app_order = json.loads((WORK_DIR / f"order-{method}.json").read_text())
    # A KeyError here means the two runs did not tokenise the same rows.
    replayed = [examples[tuple(input_ids)] for batch in app_order for input_ids in batch]
    clock = StepClock()
    output_dir = tempfile.TemporaryDirectory(dir=WORK_DIR)  # nothing is saved there
    arguments = TrainingArguments(
        output_dir=output_dir.name,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATES[method],
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # the app's schedule, so that the losses compare
        max_steps=plan.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",  # replays the app's batches in the app's order
        remove_unused_columns=False,
        seed=SEED,
        use_cpu=not torch.cuda.is_available(),  # the device the app trains on
        disable_tqdm=True,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=replayed,
        data_collator=partial(pad_to_max_length, pad_id=pad_id),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)
    with output_dir:
        trainer.train()
    return {
        "logged_at": {step: t for step, (t, _) in clock.logged.items()},
        "losses": {step: loss for step, (_, loss) in clock.logged.items()},
        "train_started_at": clock.started,
        "setup_s": clock.started - started,
        "params": sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name),
        "adapter_params": sum(p.numel() for name, p in model.named_parameters() if "lora_" in name),
    }


def pad_to_max_length(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Every batch padded to MAX_LENGTH, as a hand-written fine-tune often does."""

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (MAX_LENGTH - len(values))

    return {
        "input_ids": torch.tensor([padded(f["input_ids"], pad_id) for f in features]),
        "attention_mask": torch.tensor([padded([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": torch.tensor([padded(f["labels"], -100) for f in features]),
    }


# The forgetting probe's share of a default job -------------------------------------------------

PROBE_JOB_ROWS = 270
"""Rows of the probe's job: 30 steps of 8 training rows once a tenth is held out."""


def run_probe_job(task: str) -> dict[str, Any]:
    """A default job of `task` (the family's suggested settings, an evaluation every 10 steps) with
    the forgetting meter's work timed: the probe (forgetting.measure_base, forgetting.measure) and
    the general answers. Instruction tuning (SmolLM2, LoRA, 30 steps of 8 generated rows) answers
    them in the samples' batch: each such call is timed again without the general prompts, the
    difference is theirs and the second call is left out of the job's time. Domain adaptation
    (30 steps of 2 × 128 tokens of the sample manual) answers them in calls of their own."""
    spent = {"probe_s": 0.0, "probe_calls": 0, "answers_s": 0.0, "untimed_s": 0.0}

    def timed(function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent["probe_s"] += time.perf_counter() - started
                spent["probe_calls"] += 1

        return wrapper

    forgetting.measure_base, forgetting.measure = timed(forgetting.measure_base), timed(forgetting.measure)
    generate, general = sft.generate_replies, len(forgetting.general_prompts())

    def generate_and_time(model, tokenizer, conversations, tools=None, max_new_tokens=48):
        started = time.perf_counter()
        replies = generate(model, tokenizer, conversations, tools, max_new_tokens)
        with_general = time.perf_counter() - started
        if isinstance(max_new_tokens, list):  # the sample prompts followed by the general ones
            started = time.perf_counter()
            generate(model, tokenizer, conversations[:-general], tools[:-general], max_new_tokens[:-general])
            alone = time.perf_counter() - started
            spent["answers_s"] += with_general - alone
            spent["untimed_s"] += alone
        return replies

    def generate_answers(*args, **kwargs):
        started = time.perf_counter()
        try:
            return domain_generate(*args, **kwargs)
        finally:
            spent["answers_s"] += time.perf_counter() - started

    sft.generate_replies = generate_and_time
    domain_generate, domain.generate_replies = domain.generate_replies, generate_answers
    suggested = FAMILIES[task].suggested
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(suggested.base_model))
    data = WORK_DIR / f"probe-{task}-data.jsonl"
    rows = generate_rows(PROBE_JOB_ROWS, tokenizer, SEED + 1) if task == "sft" else domain_samples.rows()
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as output_dir:
        spec = TrainSpec(
            base_model=suggested.base_model, dataset_path=str(data), output_dir=output_dir, method=suggested.method,
            learning_rate=suggested.learning_rates[suggested.method], max_steps=suggested.max_steps,
            batch_size=suggested.batch_size, max_seq_length=suggested.max_seq_length, seed=SEED, task=task,
        )
        started = time.perf_counter()
        with Reporter() as reporter:
            (sft if task == "sft" else domain).run(spec, reporter)
        wall = time.perf_counter() - started
    job_s = wall - spent["untimed_s"]
    evaluations = sum(1 for event in reporter.events if event["kind"] == "eval")
    return spent | {"job_s": job_s, "evaluations": evaluations, "share": (spent["probe_s"] + spent["answers_s"]) / job_s,
                    "probe_tokens": len(forgetting.PROBE_FILES) * forgetting.PROBE_TOKENS}


PROBE_GOAL = 0.05


PROBE_TASKS = ("sft", "domain")


def probe_share(plan: Plan) -> dict[str, Any]:
    return {task: probe_share_of(task, plan) for task in PROBE_TASKS}


def probe_share_of(task: str, plan: Plan) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.training", "--child", "probe", task, "--threads", str(plan.threads)]
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    load_before = os.getloadavg()[0]
    subprocess.run(command, check=True, env=CHILD_ENV | os.environ | quiet, cwd=REPO_ROOT)
    result = json.loads((WORK_DIR / f"probe-{task}.json").read_text())
    result["load_average"] = [load_before, os.getloadavg()[0]]
    print(
        f"forgetting probe ({result['probe_tokens']} tokens, {result['evaluations']} evaluations, "
        f"{len(forgetting.general_prompts())} general answers before and after) in a default {task} job: "
        f"probe {result['probe_s']:.1f} s over {result['probe_calls']} passes + answers {result['answers_s']:.1f} s "
        f"of the job's {result['job_s']:.0f} s = {result['share']:.1%} "
        f"(goal ≤ {PROBE_GOAL:.0%}: {'met' if result['share'] <= PROBE_GOAL else 'NOT met'}); "
        "load average {:.1f} → {:.1f}".format(*result["load_average"])
    )
    return result


def run_child(role: str, method: str, plan: Plan) -> None:
    torch.set_num_threads(plan.threads)
    if role == "probe":
        (WORK_DIR / f"probe-{method}.json").write_text(json.dumps(run_probe_job(method)))
        return
    result = run_app(method, plan) if role == "app" else run_baseline(method, plan)
    if role == "app":
        (WORK_DIR / f"order-{method}.json").write_text(json.dumps(result.pop("batches")))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (WORK_DIR / f"{role}-{method}.json").write_text(json.dumps(result))


def spawn(role: str, method: str, plan: Plan) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.training", "--child", role, method]
    command += ["--warmup-steps", str(plan.warmup_steps), "--timed-steps", str(plan.timed_steps)]
    command += ["--threads", str(plan.threads)]
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    env = CHILD_ENV | os.environ | quiet
    load_before = os.getloadavg()[0]
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT)
    result = json.loads((WORK_DIR / f"{role}-{method}.json").read_text())
    # Other processes on the machine slow every run down, multithreaded ones the most.
    result["load_average"] = [load_before, os.getloadavg()[0]]
    for key in ("logged_at", "losses"):
        result[key] = {int(step): value for step, value in result[key].items()}
    return result


# Arithmetic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs per row: dense matmuls, LoRA adapters and causal attention.

    full:  6·N per token (forward 2·N, backward 4·N: activation and weight gradients).
    lora:  4·N per token (forward 2·N, backward 2·N: activation gradients through the frozen
           weights, no weight gradients) + 6·A (A = adapter parameters, r·(d_in + d_out) per
           adapted layer: forward, activation and weight gradients).
    attention (both): 3 × forward, forward = 2·L·d·n·(n+1) for a row of n tokens (QKᵀ and
           attention·V over the i+1 earlier positions of token i), d = heads × head_dim.
    N counts every weight once (the tied embedding once, as the output layer).
    """

    params: int
    adapter_params: int
    layers: int
    attention_width: int

    def row(self, tokens: int) -> float:
        dense = (4 * self.params + 6 * self.adapter_params) if self.adapter_params else 6 * self.params
        attention = 6 * self.layers * self.attention_width * tokens * (tokens + 1)
        return dense * tokens + attention


def matmul_peak(dtype_name: str, size: int = 3072, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matmuls: this machine's practical matmul peak (on the
    GPU when there is one: the device the app trains on).

    A CPU without bf16 instructions multiplies bf16 in a slow scalar fallback: there a 3072²
    matmul would take very long, and 512² tells the same (the app trains such a CPU in fp32;
    docs/performance.md has the figures)."""
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = size * 4 if device == "cuda" else size  # a GPU needs a bigger matmul to reach its peak
    if device == "cpu" and dtype == torch.bfloat16 and not bf16_supported():
        size, repeats = 512, 2
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(repeats):
        _synchronize()
        started = time.perf_counter()
        a @ b
        _synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarise(
    role: str, method: str, run: dict, order: list, plan: Plan, flops: FlopModel, peaks: dict
) -> dict[str, Any]:
    timed = order[plan.warmup_steps : plan.steps]
    seconds = run["logged_at"][plan.steps] - run["logged_at"][plan.warmup_steps]
    real_tokens = sum(len(ids) for batch in timed for ids in batch)
    widths = [MAX_LENGTH if role == "baseline" else max(len(ids) for ids in batch) for batch in timed]
    executed_tokens = sum(len(batch) * width for batch, width in zip(timed, widths, strict=True))
    useful = sum(flops.row(len(ids)) for batch in timed for ids in batch)
    executed = sum(len(batch) * flops.row(width) for batch, width in zip(timed, widths, strict=True))
    precision = "bf16" if role == "app" and run.get("bf16") else "fp32"
    losses = [run["losses"][step] for step in range(1, plan.steps + 1)]
    return {
        "config": f"{method} {role}",
        "precision": precision,
        "timed_steps": plan.timed_steps,
        "timed_s": seconds,
        "seconds_per_step": seconds / plan.timed_steps,
        "real_tokens": real_tokens,
        "tokens_per_s": real_tokens / seconds,
        "padding_fraction": 1 - real_tokens / executed_tokens,
        "executed_tokens_per_s": executed_tokens / seconds,
        "useful_flop_per_s": useful / seconds,
        "useful_fraction_of_peak": useful / seconds / peaks[precision],
        "executed_flop_per_s": executed / seconds,
        "executed_fraction_of_peak": executed / seconds / peaks[precision],
        "peak_rss_mib": run["peak_rss_mib"],
        "peak_gpu_mib": run.get("peak_gpu_mib"),
        "final_loss": sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:]),
        "losses": losses,
        "setup_s": run["setup_s"],
        "warmup_s": run["logged_at"][plan.warmup_steps] - run["train_started_at"],
        "export_s": run.get("export_s"),
        "step_seconds": [
            run["logged_at"][step] - run["logged_at"][step - 1] for step in range(plan.warmup_steps + 1, plan.steps + 1)
        ],
        "load_average": run["load_average"],
    }


def compare(app: dict, baseline: dict, app_run: dict) -> dict[str, Any]:
    speedup = app["tokens_per_s"] / baseline["tokens_per_s"]
    step_gaps = [abs(a - b) / b for a, b in zip(app["losses"], baseline["losses"], strict=True)]
    return {
        "tokens_per_s_ratio": speedup,
        "from_less_padding": (1 - app["padding_fraction"]) / (1 - baseline["padding_fraction"]),
        "per_executed_token": app["executed_tokens_per_s"] / baseline["executed_tokens_per_s"],
        "final_loss_gap": abs(app["final_loss"] - baseline["final_loss"]) / baseline["final_loss"],
        "largest_step_loss_gap": max(step_gaps),
        "emit_us_per_step": app_run["emit_s"] / max(1, app_run["emit_calls"]) * 1e6,
        "emit_us_max": app_run["emit_max_s"] * 1e6,
        "emit_fraction_of_step": app_run["emit_s"] / app["timed_s"],
    }


# Output --------------------------------------------------------------------------------------

GOALS = {"lora": 4.0, "qlora": 4.0, "full": 3.0}
LOSS_GOAL = 0.05
EMIT_GOAL = 0.01


def print_config(result: dict, plan: Plan) -> None:
    print(
        f"  {result['config']:<14} {result['precision']}: {result['tokens_per_s']:7.1f} real tokens/s, "
        f"{result['useful_flop_per_s'] / 1e9:6.1f} GFLOP/s ({result['useful_fraction_of_peak']:.0%} of "
        f"{result['precision']} peak; {result['executed_fraction_of_peak']:.0%} counting padding), "
        f"padding {result['padding_fraction']:.0%}, peak RSS {result['peak_rss_mib'] / 1024:.2f} GiB, "
        f"final loss {result['final_loss']:.4f}"
    )
    export = f", export {result['export_s']:.1f} s" if result["export_s"] is not None else ""
    if result["peak_gpu_mib"] is not None:
        print(f"  {'':<14} peak GPU memory {result['peak_gpu_mib'] / 1024:.2f} GiB")
    print(
        f"  {'':<14} {result['seconds_per_step']:.2f} s/step over {result['timed_steps']} timed steps; "
        f"job overhead: setup {result['setup_s']:.1f} s, warm-up {result['warmup_s']:.1f} s{export}; "
        "load average {:.1f} → {:.1f}".format(*result["load_average"])
    )
    if max(result["load_average"]) > plan.threads + 0.5:  # its own threads count too
        print(f"  {'':<14} warning: other processes ran alongside; these timings are not reliable")


def print_comparison(method: str, comparison: dict) -> None:
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    ratio, goal = comparison["tokens_per_s_ratio"], GOALS[method]
    print(
        f"  app/baseline: {ratio:.2f}× real tokens/s (goal ≥ {goal:g}×: {verdict(ratio >= goal)}) = "
        f"{comparison['from_less_padding']:.2f}× from less padding × "
        f"{comparison['per_executed_token']:.2f}× per executed token (precision, a micro-batch per core, logits on responses, shorter rows)"
    )
    gap = comparison["final_loss_gap"]
    print(
        f"  loss: final gap {gap:.1%} (goal ≤ {LOSS_GOAL:.0%}: {verdict(gap <= LOSS_GOAL)}), "
        f"largest gap at any step {comparison['largest_step_loss_gap']:.1%}"
    )
    share = comparison["emit_fraction_of_step"]
    print(
        f"  Reporter.emit: {comparison['emit_us_per_step']:.0f} µs per step (slowest {comparison['emit_us_max']:.0f} µs) "
        f"= {share:.4%} of the step time "
        f"(goal < {EMIT_GOAL:.0%}: {verdict(share < EMIT_GOAL)})"
    )


def environment() -> dict[str, Any]:
    import peft
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def prepare_data(plan: Plan) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(BASE_MODEL))
    rows = generate_rows(plan.rows, tokenizer)
    (WORK_DIR / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lengths = [len(tokenize(row, tokenizer)["input_ids"]) for row in rows]
    return {
        "rows": len(rows),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "mean_tokens": sum(lengths) / len(lengths),
    }


def flop_model(baseline_run: dict) -> FlopModel:
    config = json.loads((Path(resolve_base(BASE_MODEL)) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return FlopModel(
        params=baseline_run["params"],
        adapter_params=baseline_run["adapter_params"],
        layers=config["num_hidden_layers"],
        attention_width=config["num_attention_heads"] * head_dim,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per run")
    parser.add_argument("--only", choices=(*CUDA_METHODS, "probe"), help="benchmark one method only, or the forgetting probe")
    parser.add_argument(
        "--cuda", action="store_true", help="on the GPU (LoRA, full, QLoRA); append the numbers to docs/performance.md"
    )
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = Plan(args.warmup_steps, args.timed_steps, args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_child(*args.child, plan)
        return 0
    if args.cuda and not torch.cuda.is_available():
        print("No CUDA device on this machine: nothing to benchmark on a GPU (the CPU bench is `make bench`).")
        return 0

    started = time.time()
    results: dict[str, Any] = {"plan": asdict(plan) | {"batch_size": BATCH_SIZE, "max_length": MAX_LENGTH}}
    results["environment"] = environment()
    if results["environment"]["load_average_at_start"][0] > 0.5:
        print("warning: the machine is busy (see the load averages below); other processes slow the runs down")
    if args.only == "probe":
        results["probe"] = probe_share(plan)
        (WORK_DIR / "probe.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0
    results["matmul_peak_flop_per_s"] = peaks = measure_peaks(plan)
    results["data"] = data = prepare_data(plan)
    print(
        f"data: {data['rows']} rows, {data['min_tokens']}–{data['max_tokens']} tokens "
        f"(mean {data['mean_tokens']:.1f}); {plan.steps} steps of {BATCH_SIZE} rows, the first "
        f"{plan.warmup_steps} untimed"
    )
    methods = [args.only] if args.only else CUDA_METHODS if args.cuda else METHODS
    for method in methods:
        results[method] = benchmark(method, plan, peaks)
    if not args.cuda and not args.only:
        results["probe"] = probe_share(plan)
    results["wall_s"] = time.time() - started
    (WORK_DIR / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['wall_s'] / 60:.1f} minutes; results in {WORK_DIR / 'results.json'}")
    if args.cuda:
        append_to_doc(results, methods, " ".join(["python -m bench.training", *argv]))
        print(f"appended to {PERFORMANCE_DOC}")
    return 0


def append_to_doc(results: dict[str, Any], methods: list[str], command: str) -> None:
    """A dated section of the GPU numbers at the end of docs/performance.md."""
    env = results["environment"]
    lines = [
        "",
        f"## GPU run: {env['gpu']}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`{command}`; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; matmul peak "
        f"fp32 {results['matmul_peak_flop_per_s']['fp32'] / 1e12:.1f}, bf16 "
        f"{results['matmul_peak_flop_per_s']['bf16'] / 1e12:.1f} TFLOP/s.",
        "",
        "| config | precision | real tokens/s | s/step | padding | useful TFLOP/s, % of peak | peak GPU memory "
        "| final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        for role in ("baseline", "app"):
            r = results[method][role]
            lines.append(
                f"| {r['config']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.3f} | "
                f"{r['padding_fraction']:.0%} | {r['useful_flop_per_s'] / 1e12:.2f}, {r['useful_fraction_of_peak']:.0%} | "
                f"{(r['peak_gpu_mib'] or 0) / 1024:.2f} GiB | {r['final_loss']:.3f} |"
            )
    lines += ["", "| app ÷ baseline | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    comparisons = [results[method]["comparison"] for method in methods]
    lines.append("| real tokens/s | " + " | ".join(f"{c['tokens_per_s_ratio']:.2f}×" for c in comparisons) + " |")
    lines.append("| final loss gap | " + " | ".join(f"{c['final_loss_gap']:.1%}" for c in comparisons) + " |")
    with PERFORMANCE_DOC.open("a") as doc:
        doc.write("\n".join(lines) + "\n")


def measure_peaks(plan: Plan) -> dict[str, float]:
    torch.set_num_threads(plan.threads)
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    no_bf16 = (
        "" if torch.cuda.is_available() or bf16_supported() else " (no bf16 instructions: the app trains in fp32)"
    )
    print(
        f"matmul peak ({plan.threads} threads, best of 5): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s{no_bf16}"
    )
    return peaks


def benchmark(method: str, plan: Plan, peaks: dict[str, float]) -> dict[str, Any]:
    """The app run, then the baseline replaying its batches; printed and returned for the JSON."""
    runs = {role: spawn(role, method, plan) for role in ROLES}
    order = json.loads((WORK_DIR / f"order-{method}.json").read_text())
    flops = flop_model(runs["baseline"])
    summaries = {role: summarise(role, method, runs[role], order, plan, flops, peaks) for role in ROLES}
    comparison = compare(summaries["app"], summaries["baseline"], runs["app"])
    print(f"{method}:")
    for role in ("baseline", "app"):
        print_config(summaries[role], plan)
    print_comparison(method, comparison)
    return {**summaries, "comparison": comparison, "flop_model": asdict(flops)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
