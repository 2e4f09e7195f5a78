"""Instruction tuning (SFT): teach a causal LM to answer the way the dataset answers.

setup → train → save, on transformers' Trainer.

- Data: JSONL rows {"instruction", "response", optional "system", optional "input"}, rendered
  with the base model's chat template ("input", extra context, follows the instruction in the
  user turn). The loss is on the response only (its tokens and the end-of-turn token): every
  prompt token is labelled -100.
- Batches are padded to their longest row, and rows of similar length are batched together
  (worker.batching: length-sorted chunks, cut into batches, the batches shuffled; seeded).
- Logits are computed only where the loss reads them (the positions before a response token):
  the output layer and its log-softmax over the whole vocabulary are a large share of a small
  model's step, and most positions are prompt or padding.
- Tokenised rows are cached between jobs on the same file and tokenizer (worker.token_cache).
- Master weights stay fp32; the forward and backward passes run under bf16 autocast where the
  hardware has bf16 arithmetic (CUDA, or CPUs with AVX512-BF16 / AMX).
- Held out: eval_loss and perplexity of the untouched model (step 0, the baseline; an adapter
  job measures it with the adapters off once its first step is reported, so training starts
  sooner), every eval_every steps, and at the end; plus greedy replies to a few held-out
  instructions before and after training (result["samples"], and the final eval event), so a
  person can read what changed.
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

from worker import microbatches, token_cache
from worker.artifacts import export
from worker.batching import LengthGroupedBatches
from worker.checkpoints import Checkpointing, keep_baseline, resume_point
from worker.errors import UserError
from worker.events import Reporter
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.spec import TrainSpec

IGNORE_INDEX = -100  # label value the loss skips
SAMPLE_COUNT = 3  # held-out instructions answered before and after training
SAMPLE_NEW_TOKENS = 48
TOKENIZE_VERSION = "1"  # part of the token cache's key: change it when tokenize_example changes


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    # Setup: base model, data, method.
    reporter.state("preparing")
    set_seed(spec.seed)
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_rows, held_out = prepare_data(spec, tokenizer, reporter)
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    if spec.adapters and bf16_supported():
        store_frozen_linears_in_bf16(model)
    microbatches.use_micro_batch_dropout(model)
    progress = ReportProgress(reporter)
    trainer = LengthGroupedTrainer(
        model=model,
        args=training_arguments(spec, evaluate=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=partial(pad_batch, pad_id=tokenizer.pad_token_id),
        compute_loss_func=response_loss,
        callbacks=[progress, Checkpointing(spec, reporter)],
    )
    trainer.remove_callback(PrinterCallback)  # events go through the reporter, not stdout

    # The untouched model on the held-out rows: the baseline later numbers are compared with.
    # A job requeued after its worker died resumes from its last checkpoint and keeps the
    # baseline it measured the first time.
    sample_prompts = [prompt_messages(row) for row in held_out[:SAMPLE_COUNT]]
    resume_from, baseline = resume_point(spec, reporter)
    first_step_baseline = None
    if resume_from is not None:
        metrics_before, replies_before = baseline
    elif spec.adapters and eval_rows:
        # The untouched base is the network with its adapters switched off, however far they have
        # trained: its held-out loss is measured once the first step is reported, so training
        # starts a whole evaluation pass sooner.
        first_step_baseline = BaselineAfterFirstStep(trainer, spec, reporter)
        trainer.add_callback(first_step_baseline)
        replies_before = []
    else:
        metrics_before = held_out_metrics(trainer) if eval_rows else {}
        # Adapters leave the base untouched: its replies can wait until after training (switched
        # off), so the first step comes sooner. A full fine-tune changes the base: reply now.
        replies_before = [] if spec.adapters else generate_replies(model, tokenizer, sample_prompts)
        keep_baseline(spec, [metrics_before, replies_before])
        if eval_rows:
            reporter.eval(0, baseline=True, **metrics_before)

    # Train, then evaluate once more on the held-out rows.
    reporter.raise_if_stopped()
    trainer.train(resume_from_checkpoint=resume_from)
    reporter.raise_if_stopped()
    if first_step_baseline is not None:
        metrics_before = first_step_baseline.metrics
    step = trainer.state.global_step
    metrics_after, samples = {}, []
    if eval_rows:
        reporter.state("evaluating")
        metrics_after = held_out_metrics(trainer)
        replies_after = generate_replies(model, tokenizer, sample_prompts)
        if spec.adapters:
            with model.disable_adapter():
                replies_before = generate_replies(model, tokenizer, sample_prompts)
        samples = [
            {"instruction": row["instruction"], "reference": row["response"], "before": before, "after": after}
            for row, before, after in zip(held_out, replies_before, replies_after, strict=False)
        ]
        reporter.eval(step, final=True, **metrics_after, samples=samples)

    # Save.
    reporter.state("exporting")
    eval_loss = metrics_after.get("eval_loss")
    metrics = {"train_loss": progress.last_loss, "eval_loss": eval_loss, "steps": step}
    summary = {"primary_metric": "eval_loss", "metrics_before": metrics_before, "metrics_after": metrics_after}
    artifact_dir = export(model, tokenizer, spec, metrics | summary, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(samples, indent=2) + "\n")
    reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, "samples": samples, "artifact_dir": str(artifact_dir)}


class LengthGroupedTrainer(Trainer):
    """The Trainer, drawing its training batches from worker.batching.LengthGroupedBatches, and
    running each batch as one micro-batch per CPU core (worker.microbatches; whole on a GPU)."""

    def _get_train_sampler(self, train_dataset=None) -> LengthGroupedBatches:
        rows = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedBatches([len(row["input_ids"]) for row in rows], self.args.train_batch_size, self.args.seed)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        parts, threads_each = microbatches.plan(len(inputs["input_ids"]), self.args.device)
        if parts == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        # Each micro-batch's loss is divided by the whole batch's token count (response_loss):
        # their gradients add up to the batch's, and so do the losses.
        total = labelled_tokens(inputs["labels"]) if num_items_in_batch is None else num_items_in_batch
        step = partial(super().training_step, model, num_items_in_batch=total)
        return sum(microbatches.run(step, microbatches.split(inputs, parts), threads_each))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        parts, threads_each = microbatches.plan(len(inputs["input_ids"]), self.args.device)
        if parts == 1 or not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The batch's loss is its mean over labelled tokens: the micro-batches' means, weighted by
        # their token counts.
        micro = microbatches.split(inputs, parts)
        step = partial(super().prediction_step, model, prediction_loss_only=True, ignore_keys=ignore_keys)
        losses = [loss for loss, _, _ in microbatches.run(step, micro, threads_each)]
        counts = [labelled_tokens(batch["labels"]) for batch in micro]
        return sum(loss * count for loss, count in zip(losses, counts, strict=True)) / sum(counts), None, None


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many next-token targets a batch's labels hold (what response_loss averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def response_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the response tokens, from the logits pad_batch asked for.

    pad_batch's `logits_to_keep` mask selects position i of a row when token i + 1 is labelled;
    the model returns those logits flattened in row-major order, which is the order of the
    labels picked here. The same value as the model's own loss, without the other positions.
    """
    targets = labels[:, 1:]
    targets = targets[targets != IGNORE_INDEX]
    loss = torch.nn.functional.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(1, targets.numel()))


def store_frozen_linears_in_bf16(model: torch.nn.Module) -> None:
    """Keep the frozen linear weights in bf16 (an adapter job's base; not the trained adapters).

    Under bf16 autocast every matmul reads them in bf16 anyway, but autocast re-casts a frozen
    fp32 weight at every forward pass: a fifth of a LoRA step on a CPU. Stored in bf16 they are
    cast once, to the same values: the same numbers, half their memory. The output layer is left
    alone: it shares its weight with the input embedding, which feeds the fp32 residual stream.
    """
    output = model.get_output_embeddings()
    for module in model.modules():
        frozen = isinstance(module, torch.nn.Linear) and not module.weight.requires_grad
        if frozen and module is not output and module.weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def held_out_metrics(trainer: Trainer) -> dict[str, float]:
    return loss_metrics(trainer.evaluate()["eval_loss"])


def loss_metrics(loss: float) -> dict[str, float]:
    """What an evaluation reports: the held-out loss and its perplexity."""
    return {"eval_loss": loss, "perplexity": math.exp(loss)}


class BaselineAfterFirstStep(TrainerCallback):
    """An adapter job's step-0 baseline, measured with the adapters switched off right after the
    first step's loss is reported (the baseline event, and the baseline kept for a resume).

    Trainer.evaluate() would report an evaluation at step 1 to the callbacks (ReportProgress,
    the checkpoints' scores); its evaluation loop alone gives the same eval_loss without that.
    """

    def __init__(self, trainer: Trainer, spec: TrainSpec, reporter: Reporter):
        self.trainer, self.spec, self.reporter = trainer, spec, reporter
        self.metrics: dict[str, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.metrics is not None or not logs or "loss" not in logs:
            return
        with self.trainer.model.disable_adapter():
            output = self.trainer.evaluation_loop(self.trainer.get_eval_dataloader(), "Baseline", True)
        self.metrics = loss_metrics(output.metrics["eval_loss"])
        keep_baseline(self.spec, [self.metrics, []])
        self.reporter.eval(0, baseline=True, **self.metrics)


class ReportProgress(TrainerCallback):
    """Trainer events → reporter events; a requested stop ends training after the current step.

    Evaluations during training become eval events; the recipe reports the baseline and the final
    evaluation itself (with baseline=True / final=True).
    """

    metric_keys = {"learning_rate": "learning_rate", "grad_norm": "grad_norm"}
    """Trainer log key → metric event key, for the values reported with each step's loss."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.last_loss: float | None = None
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        self.reporter.state("training")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            values = {name: float(logs[key]) for key, name in self.metric_keys.items() if key in logs}
            self.reporter.metric(
                state.global_step,
                loss=self.last_loss,
                total_steps=state.max_steps,
                epoch=round(float(state.epoch or 0), 4),
                **values,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.training:
            return
        self.reporter.eval(state.global_step, **loss_metrics(float(metrics["eval_loss"])))

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
        save_strategy="steps",  # resumable checkpoints; worker.checkpoints signs and prunes them
        save_steps=spec.checkpoint_every,
        report_to="none",
        # Off by default: recomputing the forward pass costs about a third of a step; on for
        # large models on small GPUs (memory for time).
        activation_checkpointing=spec.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with a frozen embedding (LoRA)
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # the held-out metrics need the loss only, not every logit
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


def prepare_data(spec: TrainSpec, tokenizer, reporter: Reporter) -> tuple[list[dict], list[dict], list[dict]]:
    """Tokenised training and held-out rows (seeded split of the file's rows), and the held-out rows as read."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be instruction-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    examples = tokenize_file(Path(spec.dataset_path), tokenizer, spec.max_seq_length, reporter)
    if spec.validation_path:
        train = examples
        held = tokenize_file(
            Path(spec.validation_path), tokenizer, spec.max_seq_length, reporter, "the validation file"
        )
    else:
        train, held = split_rows(examples, spec.validation_fraction, spec.seed)
    train_rows = kept_examples(train, spec.max_seq_length, reporter, "training")
    eval_rows = kept_examples(held, spec.max_seq_length, reporter, "validation")
    held_out = [row for row, _ in held]
    if not train_rows:
        raise UserError(
            f"No training row fits in max_seq_length={spec.max_seq_length} tokens with room for "
            "its response. Raise the maximum length or shorten the instructions."
        )
    reporter.log(f"{len(train_rows)} training rows, {len(eval_rows)} validation rows.")
    return train_rows, eval_rows, held_out


def tokenize_file(path: Path, tokenizer, max_length: int, reporter: Reporter, name: str = "") -> list[tuple[dict, Any]]:
    """(row, tokenize_example(row)) for the rows of a JSONL file; the tokens come from the token
    cache when this file was tokenised before with this tokenizer and max_length."""
    try:
        rows = read_rows(path)
    except UserError as exc:
        if not name:
            raise
        raise UserError(f"In {name}: {exc}") from exc
    key = token_cache.cache_key(path, tokenizer, max_length, TOKENIZE_VERSION)
    examples, hit = token_cache.cached(key, lambda: [tokenize_example(row, tokenizer, max_length) for row in rows])
    if hit:
        reporter.log(f"Tokenised rows of {name or 'the dataset'} reused from an earlier job.")
    return list(zip(rows, examples, strict=True))


def kept_examples(pairs: list[tuple[dict, dict | None]], max_length: int, reporter: Reporter, split: str) -> list[dict]:
    """The tokenised rows of (row, example) pairs that kept a response token after truncation."""
    kept = [example for _, example in pairs if example is not None]
    if len(kept) < len(pairs):
        reporter.log(
            f"Skipped {len(pairs) - len(kept)} of {len(pairs)} {split} rows: after truncation to "
            f"{max_length} tokens no response token was left."
        )
    return kept


def read_rows(path: Path, fields: tuple[str, ...] = ("instruction", "response")) -> list[dict[str, str]]:
    """The JSONL rows of `path`, each of which must hold text in every one of `fields`."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"Line {number} of the dataset is not valid JSON: {exc.msg}.") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in fields):
            names = ", ".join(fields[:-1]) + f" and {fields[-1]}"
            raise UserError(f"Line {number} of the dataset needs text fields {names}.")
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


def tokenize_example(row: dict[str, str], tokenizer, max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels for one row (labels -100 on the prompt); None if no response fits."""
    messages = prompt_messages(row)
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True)
    prompt = render(messages, add_generation_prompt=True)
    full = render(messages + [{"role": "assistant", "content": row["response"]}])
    prompt_length = _common_prefix_length(prompt, full)
    labels = [IGNORE_INDEX] * prompt_length + full[prompt_length:]
    if prompt_length >= max_length:
        return None
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def prompt_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """The system and user turns of a row, before the assistant's reply."""
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return messages + [{"role": "user", "content": user}]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch; padding is masked from attention and loss.

    logits_to_keep marks the positions whose next token is labelled: the only logits the loss
    reads (see response_loss).
    """
    width = max(len(f["input_ids"]) for f in features)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    labels = torch.tensor([padded(f["labels"], IGNORE_INDEX) for f in features])
    return {
        "input_ids": torch.tensor([padded(f["input_ids"], pad_id) for f in features]),
        "attention_mask": torch.tensor([padded([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": labels,
        "logits_to_keep": torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False),
    }


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Greedy replies (up to SAMPLE_NEW_TOKENS tokens) to each conversation, in one left-padded batch."""
    if not conversations:
        return []
    prompts = [
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True
        )
        for messages in conversations
    ]
    width = max(len(prompt) for prompt in prompts)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    was_training = model.training
    model.eval()
    # On a CPU, decoding a few rows a token at a time is bound by reading the weights, and
    # autocast re-casts every fp32 weight to bf16 at every token: fp32 decodes 2.3× faster,
    # unless the weights are stored in bf16 already (store_frozen_linears_in_bf16).
    stored_bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.autocast(
        model.device.type,
        dtype=torch.bfloat16,
        enabled=bf16_supported() and (model.device.type != "cpu" or stored_bf16),
    ):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=SAMPLE_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id,
        )
    model.train(was_training)
    return [reply.strip() for reply in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]
