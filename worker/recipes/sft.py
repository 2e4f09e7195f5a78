"""Instruction tuning (SFT): teach a causal LM to answer the way the dataset answers.

setup → train → save, on transformers' Trainer.

- Data: JSONL rows {"instruction", "response", optional "system"}, rendered with the base
  model's chat template. The loss is on the response only (its tokens and the end-of-turn
  token): every prompt token is labelled -100.
- Batches are padded to their longest row, and rows of similar length are batched together.
- Master weights stay fp32; the forward and backward passes run under bf16 autocast where the
  hardware has bf16 arithmetic (CUDA, or CPUs with AVX512-BF16 / AMX).
"""

from __future__ import annotations

import json
import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from worker.artifacts import export
from worker.errors import Cancelled, UserError
from worker.events import Reporter
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.spec import TrainSpec

IGNORE_INDEX = -100  # label value the loss skips


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    # Setup: base model, data, method.
    reporter.state("preparing")
    set_seed(spec.seed)
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_rows = prepare_data(spec, tokenizer, reporter)
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    progress = ReportProgress(reporter)
    trainer = Trainer(
        model=model,
        args=training_arguments(spec, evaluate=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=partial(pad_batch, pad_id=tokenizer.pad_token_id),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout

    # Train, then evaluate once more on the held-out rows.
    _raise_if_stopped(reporter)
    trainer.train()
    _raise_if_stopped(reporter)
    eval_loss = None
    if eval_rows:
        reporter.state("evaluating")
        eval_loss = trainer.evaluate()["eval_loss"]

    # Save.
    reporter.state("exporting")
    metrics = {"train_loss": progress.last_loss, "eval_loss": eval_loss, "steps": trainer.state.global_step}
    artifact_dir = export(model, tokenizer, spec, metrics, Path(spec.output_dir) / "final")
    reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, "artifact_dir": str(artifact_dir)}


class ReportProgress(TrainerCallback):
    """Trainer events → reporter events; a requested stop ends training after the current step."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.last_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter.state("training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            values = {key: float(logs[key]) for key in ("learning_rate", "grad_norm") if key in logs}
            self.reporter.metric(
                state.global_step,
                loss=self.last_loss,
                total_steps=state.max_steps,
                epoch=round(float(state.epoch or 0), 4),
                **values,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = float(metrics["eval_loss"])
        self.reporter.eval(state.global_step, eval_loss=loss, perplexity=math.exp(loss))

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter.stop_requested.is_set():
            control.should_training_stop = True
        if control.should_training_stop:
            control.should_evaluate = False  # the recipe evaluates once after training


def training_arguments(spec: TrainSpec, evaluate: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=spec.output_dir,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a ratio of the total steps when below 1
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        logging_steps=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=spec.eval_every,
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        label_names=["labels"],
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: CUDA that supports it, or a CPU with bf16 instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# Data -----------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, tokenizer, reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """Tokenised training and held-out rows (seeded split of the file's rows)."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be instruction-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    rows = read_rows(Path(spec.dataset_path))
    train, held_out = split_rows(rows, spec.validation_fraction, spec.seed)
    train_rows = tokenize_rows(train, tokenizer, spec.max_seq_length, reporter, "training")
    eval_rows = tokenize_rows(held_out, tokenizer, spec.max_seq_length, reporter, "validation")
    if not train_rows:
        raise UserError(
            f"No training row fits in max_seq_length={spec.max_seq_length} tokens with room for "
            "its response. Raise the maximum length or shorten the instructions."
        )
    reporter.log(f"{len(train_rows)} training rows, {len(eval_rows)} validation rows.")
    return train_rows, eval_rows


def read_rows(path: Path) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} of the dataset is not valid JSON: {exc.msg}.") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("instruction", "response")):
            raise UserError(f"Line {number} of the dataset needs text fields instruction and response.")
        rows.append(row)
    if not rows:
        raise UserError("The dataset has no rows.")
    return rows


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, then `fraction` of the rows held out (at least one)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held_out = set(order[:held])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [row for i, row in enumerate(rows) if i in held_out],
    )


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, reporter: Reporter, split: str) -> list[dict]:
    examples = [tokenize_example(row, tokenizer, max_length) for row in rows]
    kept = [example for example in examples if example is not None]
    if len(kept) < len(rows):
        reporter.log(
            f"Skipped {len(rows) - len(kept)} of {len(rows)} {split} rows: after truncation to "
            f"{max_length} tokens no response token was left."
        )
    return kept


def tokenize_example(row: dict[str, str], tokenizer, max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels for one row (labels -100 on the prompt); None if no response fits."""
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages.append({"role": "user", "content": row["instruction"]})
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True)
    prompt = render(messages, add_generation_prompt=True)
    full = render(messages + [{"role": "assistant", "content": row["response"]}])
    prompt_length = _common_prefix_length(prompt, full)
    labels = [IGNORE_INDEX] * prompt_length + full[prompt_length:]
    if prompt_length >= max_length:
        return None
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch; padding is masked from attention and loss."""
    width = max(len(f["input_ids"]) for f in features)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([padded(f["input_ids"], pad_id) for f in features]),
        "attention_mask": torch.tensor([padded([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": torch.tensor([padded(f["labels"], IGNORE_INDEX) for f in features]),
    }


def _raise_if_stopped(reporter: Reporter) -> None:
    if reporter.stop_requested.is_set():
        raise Cancelled("Training was stopped on request.")
