"""What every recipe does with its Trainer: the arguments it trains with on this machine, and
the training itself, between two stop checks."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers import Trainer, TrainingArguments

from worker.events import Reporter
from worker.hardware import bf16_supported
from worker.spec import TrainSpec

Arguments = TypeVar("Arguments", bound=TrainingArguments)


def arguments(spec: TrainSpec, kind: type[Arguments] = TrainingArguments, **recipe: Any) -> Arguments:
    """`kind` (TrainingArguments or a library's subclass of it) for `spec` on this machine; `recipe`
    holds the recipe's own arguments, and overrides these."""
    shared = dict(
        output_dir=spec.output_dir,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.05,  # a ratio of the total steps when below 1
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.epochs,
        logging_steps=1,
        eval_strategy="no",  # the recipes measure their own held-out metrics, not only the loss
        save_strategy="steps",  # resumable checkpoints; worker.checkpoints signs and prunes them
        save_steps=spec.checkpoint_every,
        report_to="none",
        activation_checkpointing=False,  # DPOConfig would turn it on: slower, and not needed here
        dataloader_num_workers=0,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=bf16_supported(),  # DPOConfig defaults to bf16 even where it is slow
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    return kind(**(shared | recipe))


def train(trainer: Trainer, resume_from: str | None, reporter: Reporter) -> int:
    """Train (on from the checkpoint `resume_from`, when set) and return the last step; a stop
    requested before or during training ends the run here (Cancelled)."""
    reporter.raise_if_stopped()
    trainer.train(resume_from_checkpoint=resume_from)
    reporter.raise_if_stopped()
    return trainer.state.global_step


def without_autocast(trainer: Trainer, model: torch.nn.Module) -> None:
    """Training ran the forward pass under autocast (accelerate wraps model.forward): undo that, so
    the final evaluation and the artifact see the model as a user runs it, in full precision."""
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
