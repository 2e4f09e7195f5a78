"""Instruction tuning (SFT): teach a causal LM to answer the way the dataset answers.

setup → train → save, on transformers' Trainer.

- Data: JSONL rows {"instruction", "response", optional "system", optional "input"}, or a
  conversation {"messages", optional "tools"} of any length (worker.conversations), rendered
  with the base model's chat template ("input", extra context, follows the instruction in the
  user turn; tools through the template where it knows them, else in the Hermes format). The
  loss is on the assistant's turns only (their tokens and end-of-turn tokens; every one, or the
  last with loss_on_turns="last"): system, user and tool-result tokens are labelled -100. A
  conversation too long for max_seq_length keeps whole turns from the start.
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
- Replay (replay_fraction > 0): rows of general text (worker/probes/replay.txt, never the probe
  set) make that share of the training rows, with the loss on every token, to forget less.
- The forgetting meter (worker.forgetting) rides along with every evaluation: general_perplexity,
  general_kl and forgetting on the probe set no job trains on, against the base's top-k kept at
  step 0 (with the baseline, for a resumed attempt); and the answers to a few general prompts
  before and after (result["general_answers"]), generated in the same batch as the samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from worker import forgetting, microbatches, token_cache, training
from worker.artifacts import export
from worker.batching import LengthGroupedBatches
from worker.checkpointing import Checkpointing
from worker.checkpoints import keep_baseline, resume_point
from worker.conversations import (
    conversation,
    for_template,
    last_reply,
    parse_tool_calls,
    prompt_messages,
    reply_text,
    template_knows_tools,
    template_prompt,
    to_json_value,
)
from worker.errors import UserError
from worker.events import Reporter
from worker.families import FAMILIES
from worker.generation import SAMPLE_COUNT, SAMPLE_NEW_TOKENS, generate_replies
from worker.hardware import bf16_supported
from worker.models import apply_method, load_causal_lm
from worker.params import census
from worker.progress import ReportProgress
from worker.rows import pair_input, read_rows, split_rows, validation_split
from worker.snapshots import Snapshots
from worker.spec import TrainSpec

FIELDS = FAMILIES["sft"].required
IGNORE_INDEX = -100  # label value the loss skips
TOOL_EVAL_ROWS = 32  # held-out rows ending with a tool call that the tool-call metrics generate for
TOOL_CALL_TOKENS = 96  # enough for one call with a few arguments
TOKENIZE_VERSION = "2"  # part of the token cache's key: change it when tokenize_example changes


def run(spec: TrainSpec, reporter: Reporter) -> dict[str, Any]:
    setup = set_up(spec, reporter)
    resume_from, baseline = measure_baseline(setup)
    step = training.train(setup.trainer, resume_from, reporter)
    metrics_after, replies = evaluate_after_training(setup, baseline, step)
    return save(setup, baseline, metrics_after, replies, step)


@dataclass
class Setup:
    """What one SFT run trains and evaluates."""

    spec: TrainSpec
    reporter: Reporter
    model: Any
    tokenizer: Any
    trainer: Trainer
    progress: ReportProgress
    eval_rows: list[dict]
    """The tokenised held-out rows; empty when nothing is held out (no metrics, no samples)."""
    held_out: list[dict]
    """The held-out rows as read (their instructions and reference responses)."""

    @property
    def sample_prompts(self) -> list[tuple[list[dict], list[dict] | None]]:
        """(messages, tools) of the first held-out rows, as the chat template takes them."""
        return [template_messages(row, self.tokenizer, prompt_only=True) for row in self.held_out[:SAMPLE_COUNT]]

    def replies(self) -> tuple[list[str], list[str]]:
        """(the replies to the sample prompts, the answers to the general prompts), in one batch."""
        prompts, general = self.sample_prompts, forgetting.general_conversations()
        replies = generate_replies(
            self.model, self.tokenizer, [m for m, _ in prompts] + general, [t for _, t in prompts] + [None] * len(general),
            max_new_tokens=[SAMPLE_NEW_TOKENS] * len(prompts) + [forgetting.ANSWER_TOKENS] * len(general),
        )
        return replies[: len(prompts)], replies[len(prompts) :]

    def general_metrics(self, baseline: Baseline) -> dict[str, float]:
        """The forgetting meter against the base's kept reference ({} before it is measured, or for
        a job resumed from a baseline kept without one)."""
        return forgetting.measure(self.model, baseline.general) if baseline.general else {}

    def tool_metrics(self) -> dict[str, float]:
        """How often the model, asked the held-out rows that end with a tool call, calls the same
        tool (tool_name_accuracy) with JSON-equal arguments (tool_arguments_accuracy); greedy, up
        to TOOL_EVAL_ROWS rows. {} when no held-out row ends with a call."""
        rows = [row for row in self.held_out if last_reply(row).get("tool_calls")][:TOOL_EVAL_ROWS]
        if not rows:
            return {}
        prompts = [template_messages(row, self.tokenizer, prompt_only=True) for row in rows]
        replies = generate_replies(self.model, self.tokenizer, [m for m, _ in prompts], [t for _, t in prompts],
                                   max_new_tokens=TOOL_CALL_TOKENS)
        names = arguments = 0
        for row, reply in zip(rows, replies, strict=True):
            expected, called = last_reply(row)["tool_calls"][0], parse_tool_calls(reply)
            if called and called[0]["name"] == expected["name"]:
                names += 1
                arguments += to_json_value(called[0]["arguments"]) == expected["arguments"]
        return {"tool_name_accuracy": names / len(rows), "tool_arguments_accuracy": arguments / len(rows)}


@dataclass
class Baseline:
    """The untouched model on the held-out rows: the numbers later ones are compared with."""

    metrics: dict[str, float] | None = None
    """Filled in during training when it is measured after the first step."""
    replies: list[str] = field(default_factory=list)
    """Its replies to the sample prompts; [] for an adapter job, whose base replies after training."""
    general: forgetting.Reference | None = None
    """Its top-k next tokens on the probe set, what the forgetting meter compares with."""
    general_answers: list[str] = field(default_factory=list)
    """Its answers to the general prompts; [] for an adapter job (as replies)."""

    def kept(self) -> list:
        """What keep_baseline stores for a resumed attempt (kept_baseline reads it back)."""
        general = {"reference": self.general.to_json(), "answers": self.general_answers} if self.general else None
        return [self.metrics, self.replies, general]


def set_up(spec: TrainSpec, reporter: Reporter) -> Setup:
    """The base model with its method applied, the tokenised rows, and a Trainer over them."""
    reporter.state("preparing")
    set_seed(spec.seed)
    model, tokenizer = load_causal_lm(spec)
    train_rows, eval_rows, held_out = prepare_data(spec, tokenizer, reporter)
    train_rows += replay(spec, tokenizer, reporter, len(train_rows))
    model = apply_method(model, spec)
    reporter.params(census(model, spec))
    if spec.adapters and bf16_supported():
        store_frozen_linears_in_bf16(model)
    microbatches.use_micro_batch_dropout(model)
    progress = ReportLossEvaluations(reporter)
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
    return Setup(spec, reporter, model, tokenizer, trainer, progress, eval_rows, held_out)


def replay(spec: TrainSpec, tokenizer, reporter: Reporter, training_rows: int) -> list[dict]:
    """General-text rows to mix into the training rows (spec.replay_fraction of them; the
    length-grouped batches spread them): the remedy for forgetting."""
    count = forgetting.replay_count(training_rows, spec.replay_fraction)
    if not count:
        return []
    reporter.log(f"Replay: {count} rows of general text mixed into the {training_rows} training rows "
                 f"({spec.replay_fraction:.0%} of all), the loss on every token.")
    return forgetting.replay_rows(tokenizer, count, spec.max_seq_length)


# Baseline: one of three ways ------------------------------------------------------------------


def measure_baseline(setup: Setup) -> tuple[str | None, Baseline]:
    """(the checkpoint to resume from, or None; the untouched model's baseline)."""
    resume_from, kept = resume_point(setup.spec, setup.reporter)
    if resume_from is not None:
        baseline = kept_baseline(kept)
    elif setup.spec.adapters and setup.eval_rows:
        baseline = baseline_after_first_step(setup)
    else:
        baseline = baseline_before_training(setup)
    setup.progress.general = partial(setup.general_metrics, baseline)
    return resume_from, baseline


def kept_baseline(kept: list) -> Baseline:
    # A job requeued after its worker died resumes from its last checkpoint: the untouched model
    # is gone by then, so it keeps the baseline it measured the first time (the forgetting
    # meter's reference included; a baseline kept before the meter existed has none).
    metrics, replies, general = (*kept, None)[:3]
    if not general:
        return Baseline(metrics, replies)
    return Baseline(metrics, replies, forgetting.Reference.from_json(general["reference"]), general["answers"])


def baseline_after_first_step(setup: Setup) -> Baseline:
    # An adapter job's untouched base is the network with its adapters switched off, however far
    # they have trained: its held-out loss is measured once the first step is reported, so
    # training starts a whole evaluation pass sooner.
    baseline = Baseline()
    setup.trainer.add_callback(BaselineAfterFirstStep(setup, baseline))
    return baseline


def baseline_before_training(setup: Setup) -> Baseline:
    # A full fine-tune changes the base, so it replies now (an adapter job comes here only when
    # nothing is held out: nothing to evaluate, nor to reply to).
    if not setup.eval_rows:
        keep_baseline(setup.spec, Baseline({}).kept())
        return Baseline({})
    general, reference = forgetting.measure_base(setup.model, setup.tokenizer)
    metrics = held_out_metrics(setup.trainer) | setup.tool_metrics() | general
    replies, answers = setup.replies()
    baseline = Baseline(metrics, replies, reference, answers)
    keep_baseline(setup.spec, baseline.kept())
    setup.reporter.eval(0, baseline=True, **metrics)
    return baseline


class BaselineAfterFirstStep(TrainerCallback):
    """An adapter job's step-0 baseline, measured with the adapters switched off right after the
    first step's loss is reported (the baseline event, and the baseline kept for a resume).

    Trainer.evaluate() would report an evaluation at step 1 to the callbacks (ReportProgress,
    the checkpoints' scores); its evaluation loop alone gives the same eval_loss without that.
    """

    def __init__(self, setup: Setup, baseline: Baseline):
        self.setup, self.baseline = setup, baseline

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.baseline.metrics is not None or not logs or "loss" not in logs:
            return
        trainer = self.setup.trainer
        with trainer.model.disable_adapter():
            output = trainer.evaluation_loop(trainer.get_eval_dataloader(), "Baseline", True)
            tools = self.setup.tool_metrics()
            general, self.baseline.general = forgetting.measure_base(trainer.model, self.setup.tokenizer)
        self.baseline.metrics = loss_metrics(output.metrics["eval_loss"]) | tools | general
        keep_baseline(self.setup.spec, self.baseline.kept())
        self.setup.reporter.eval(0, baseline=True, **self.baseline.metrics)


# After training -------------------------------------------------------------------------------


def evaluate_after_training(setup: Setup, baseline: Baseline, step: int) -> tuple[dict[str, float], dict[str, list]]:
    """The held-out metrics (with the forgetting meter's), and the replies before and after
    training: {"samples": the held-out instructions', "general_answers": the general prompts'}
    ({} and empty lists when nothing is held out)."""
    if not setup.eval_rows:
        return {}, {"samples": [], "general_answers": []}
    setup.reporter.state("evaluating")
    metrics = held_out_metrics(setup.trainer) | setup.tool_metrics() | setup.general_metrics(baseline)
    replies_after, answers_after = setup.replies()
    replies_before, answers_before = baseline.replies, baseline.general_answers
    if setup.spec.adapters:
        with setup.model.disable_adapter():
            replies_before, answers_before = setup.replies()
    samples = [
        {"instruction": prompt_messages(row)[-1]["content"], "reference": reply_text(last_reply(row)),
         "before": before, "after": after}
        for row, before, after in zip(setup.held_out, replies_before, replies_after, strict=False)
    ]
    general_answers = forgetting.answers_table(answers_before, answers_after)
    setup.reporter.eval(step, final=True, **metrics, samples=samples, general_answers=general_answers)
    return metrics, {"samples": samples, "general_answers": general_answers}


def save(setup: Setup, baseline: Baseline, metrics_after: dict, replies: dict[str, list], step: int) -> dict[str, Any]:
    """The artifact folder and eval_predictions.json; the job's result."""
    spec, reporter = setup.spec, setup.reporter
    reporter.state("exporting")
    metrics = {"train_loss": setup.progress.last_loss, "eval_loss": metrics_after.get("eval_loss"), "steps": step}
    summary = {"primary_metric": FAMILIES["sft"].primary_metric, "metrics_before": baseline.metrics, "metrics_after": metrics_after}
    card = metrics | summary
    checkpoints = Snapshots(spec).export(setup.model, step, metrics_after, card,
                                         lambda model, folder, values: export(model, setup.tokenizer, spec, values, folder))
    artifact_dir = export(setup.model, setup.tokenizer, spec, card, Path(spec.output_dir) / "final")
    (Path(spec.output_dir) / "eval_predictions.json").write_text(json.dumps(replies["samples"], indent=2) + "\n")
    reporter.artifact(str(artifact_dir), method=spec.method, **metrics)
    return {**metrics, **summary, **replies, "artifact_dir": str(artifact_dir), "checkpoints": checkpoints}


# Training -------------------------------------------------------------------------------------


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


class ReportLossEvaluations(ReportProgress):
    """ReportProgress, plus the Trainer's evaluations during training as eval events; the recipe
    reports the baseline and the final evaluation itself (with baseline=True / final=True)."""

    def __init__(self, reporter: Reporter):
        super().__init__(reporter)
        self.training = False
        self.general: Callable[[], dict[str, float]] = dict
        """The forgetting meter's values for each evaluation (set once the baseline is known)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.training:
            return
        self.reporter.eval(state.global_step, **loss_metrics(float(metrics["eval_loss"])), **self.general())

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if control.should_training_stop:
            control.should_evaluate = False  # the recipe evaluates once after training


def training_arguments(spec: TrainSpec, evaluate: bool) -> TrainingArguments:
    return training.arguments(
        spec,
        per_device_eval_batch_size=spec.batch_size,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=spec.eval_every,
        # Off by default: recomputing the forward pass costs about a third of a step; on for
        # large models on small GPUs (memory for time).
        activation_checkpointing=spec.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with a frozen embedding (LoRA)
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # the held-out metrics need the loss only, not every logit
        include_num_input_tokens_seen="non_padding",  # each step's metric event counts the tokens trained on
    )


# Data -----------------------------------------------------------------------------------------


def prepare_data(spec: TrainSpec, tokenizer, reporter: Reporter) -> tuple[list[dict], list[dict], list[dict]]:
    """Tokenised training and held-out rows (seeded split of the file's rows), and the held-out rows as read."""
    if not tokenizer.chat_template:
        raise UserError(
            f"{spec.base_model} has no chat template, so it cannot be instruction-tuned here. "
            "Choose an instruction (chat) model such as smollm2-135m-instruct."
        )
    examples = tokenize_file(
        Path(spec.dataset_path), tokenizer, spec.max_seq_length, reporter, loss_on_turns=spec.loss_on_turns)
    if spec.validation_path:
        held = tokenize_file(
            Path(spec.validation_path), tokenizer, spec.max_seq_length, reporter, "the validation file",
            spec.loss_on_turns,
        )
        train, held = validation_split(examples, held, spec.drop_validation_overlap, key=pair_input, new_first=True)
    else:
        train, held = split_rows(examples, spec.validation_fraction, spec.seed, key=pair_input)
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


def tokenize_file(
    path: Path, tokenizer, max_length: int, reporter: Reporter, name: str = "", loss_on_turns: str = "all"
) -> list[tuple[dict, Any]]:
    """(row, tokenize_example(row)) for the rows of a JSONL file; the tokens come from the token
    cache when this file was tokenised before with this tokenizer, max_length and loss choice."""
    try:
        rows = read_rows(path, (), keep=_sft_row, fields_named="instruction and response, or messages")
    except UserError as exc:
        if not name:
            raise
        raise UserError(f"In {name}: {exc}") from exc
    key = token_cache.cache_key(path, tokenizer, max_length, f"{TOKENIZE_VERSION}:{loss_on_turns}")
    examples, hit = token_cache.cached(
        key, lambda: [tokenize_example(row, tokenizer, max_length, loss_on_turns) for row in rows])
    if hit:
        reporter.log(f"Tokenised rows of {name or 'the dataset'} reused from an earlier job.")
    return list(zip(rows, examples, strict=True))


def _sft_row(row: dict, where: str) -> dict:
    """A row with text in instruction and response, or a conversation ending with an assistant turn."""
    messages = row.get("messages")
    if messages is None:
        if not all(isinstance(row.get(name), str) for name in FIELDS):
            raise UserError(f"{where} needs text fields instruction and response, or messages.")
        return row
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise UserError(f"{where}: its messages must be a conversation ending with an assistant turn.")
    return row


def kept_examples(pairs: list[tuple[dict, dict | None]], max_length: int, reporter: Reporter, split: str) -> list[dict]:
    """The tokenised rows of (row, example) pairs that kept a response token after truncation."""
    kept = [example for _, example in pairs if example is not None]
    if len(kept) < len(pairs):
        reporter.log(
            f"Skipped {len(pairs) - len(kept)} of {len(pairs)} {split} rows: after truncation to "
            f"{max_length} tokens no response token was left."
        )
    cut = [example["turns_cut"] for example in kept if example.get("turns_cut")]
    if cut:
        reporter.log(
            f"{len(cut)} {split} conversations are longer than {max_length} tokens: each was cut after "
            f"its last assistant turn that fits, {sum(cut)} later turns in all."
        )
    return kept


def tokenize_example(
    row: dict, tokenizer, max_length: int, loss_on_turns: str = "all"
) -> dict[str, Any] | None:
    """input_ids and labels for one row (labels -100 except on the assistant turns that carry the
    loss: each one, or with loss_on_turns="last" the final one); None if no labelled token fits.

    A conversation longer than max_length keeps whole turns from the start, up to the last
    labelled assistant turn that fits ("turns_cut": how many turns were left out); when not even
    the first labelled turn fits whole, its reply is cut at max_length, as a single exchange's is."""
    rendered, tools = template_messages(row, tokenizer)
    # sanitize_control_tokens: a literal "<|im_end|>" typed in the data stays text.
    render = partial(tokenizer.apply_chat_template, return_dict=False, sanitize_control_tokens=True, tools=tools)
    full = render(rendered)
    turns = [i for i, message in enumerate(rendered) if message["role"] == "assistant"]
    labelled = turns[-1:] if loss_on_turns == "last" else turns
    labels = [IGNORE_INDEX] * len(full)
    spans = {}
    for i in labelled:
        # A turn's tokens: after the conversation up to it with the assistant's header, up to the
        # conversation through it (its end-of-turn token included).
        start = _common_prefix_length(render(rendered[:i], add_generation_prompt=True), full)
        end = len(full) if i == len(rendered) - 1 else _common_prefix_length(render(rendered[: i + 1]), full)
        labels[start:end] = full[start:end]
        spans[i] = (start, end)
    if spans[labelled[0]][0] >= max_length:
        return None
    if len(full) <= max_length:
        return {"input_ids": full, "labels": labels}
    fitting = [i for i in labelled if spans[i][1] <= max_length]
    if not fitting:
        return {"input_ids": full[:max_length], "labels": labels[:max_length]}
    end = spans[fitting[-1]][1]
    return {"input_ids": full[:end], "labels": labels[:end], "turns_cut": len(rendered) - 1 - fitting[-1]}


def template_messages(row: dict, tokenizer, prompt_only: bool = False) -> tuple[list[dict], list[dict] | None]:
    """The row's conversation (or, prompt_only, the turns before its last reply) as the base's chat
    template takes it, and its tools (worker.conversations.for_template)."""
    if prompt_only:
        return template_prompt(row, tokenizer)
    return for_template(conversation(row), row.get("tools"), template_knows_tools(tokenizer.chat_template))


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
