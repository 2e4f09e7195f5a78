"""TrainSpec: the one contract between the web app and the worker.

A typed, validated, JSON-serialisable description of one fine-tune, in two parts:
`TrainChoices`, what the user chose (the web form validates exactly this and shows each
complaint on the field it names), and `TrainSpec`, those choices plus where the worker runs
them (files, working folder, job id). The worker runs a TrainSpec; every checkpoint and
artifact carries the resolved copy as ``train_spec.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Self

from worker.families import FAMILIES

TASKS = tuple(FAMILIES)
METHODS = ("lora", "qlora", "full", "head")
ADAPTER_METHODS = ("lora", "qlora")
"""Methods that train LoRA adapters on a frozen base (qlora: the base loaded in 4 bits)."""
# The linear layers of llama-style decoders; "all-linear" adapts every linear layer of any model.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
LOSS_ON_TURNS = ("all", "last")
MAX_REPLAY = 0.5
"""The largest share of general text replay may mix into instruction tuning's training rows."""


class SpecError(ValueError):
    """An impossible setting, named by the field that holds it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass
class TrainChoices:
    """What the user chose for one fine-tune; validated on construction."""

    base_model: str
    """Catalog key (see worker.catalog), a local model directory, or a Hugging Face Hub id."""
    task: str = "sft"
    """Task family; selects the recipe in worker/recipes."""
    method: str = "lora"
    """lora: low-rank adapters on a frozen base; qlora: the same on a base quantised to 4 bits
    (NF4, CUDA with bitsandbytes only); full: every weight; head: only the task head."""
    lora_r: int = 16
    """LoRA rank: the inner dimension of the A·B update."""
    lora_alpha: int = 32
    """LoRA scale numerator; the update is scaled by alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters (module names, or "all-linear"); all of them learns far
    faster than q,v alone."""
    use_dora: bool = False
    """DoRA: LoRA with a learned magnitude per output (often better at low rank, a bit slower)."""
    dpo_beta: float = 0.1
    """DPO and KTO: how far the tuned model may move from the base (higher stays closer)."""
    dpo_sft_weight: float = 1.0
    """DPO only: weight of a likelihood term on the chosen reply (RPO); without it (0, pure DPO)
    the model learns to rank the pair but its own replies barely change."""
    loss_on_turns: str = "all"
    """Instruction tuning on conversations: "all" puts the loss on every assistant turn, "last"
    on the final one only (the earlier turns are then context). One exchange is the same either way."""
    replay_fraction: float = 0.0
    """Instruction tuning: the share of training rows that are general text (replay, loss on every
    token), mixed into the batches to hold on to what the base knew; 0 = none, at most 0.5."""
    learning_rate: float = 2e-3
    """Peak learning rate (linear decay after a short warm-up)."""
    epochs: float = 1.0
    """Passes over the training split; ignored when max_steps is set."""
    max_steps: int | None = 30
    """Stop after this many optimizer steps; None trains for `epochs`."""
    batch_size: int = 8
    """Rows per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory (bigger
    models or batches fit), about a third more time per step."""
    max_seq_length: int = 512
    """Tokens per row after the chat template; longer rows are truncated."""
    validation_fraction: float = 0.1
    """Share of rows held out for the validation loss (seeded, stable split; rows with the same
    input stay on one side)."""
    drop_validation_overlap: bool = False
    """With an uploaded validation file: leave out of training the rows whose input a validation
    row also has, so that the held-out metrics measure generalisation, not memory."""
    eval_every: int = 10
    """Evaluate the validation loss every this many steps (and at the end)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (a requeued job resumes from it)."""
    checkpoint_minutes: float = 10.0
    """...and at least this often, whatever the step count."""
    seed: int = 42
    """Seed for the split, the adapter initialisation and data order."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError("task", f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise SpecError("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        methods = FAMILIES[self.task].methods
        if self.method not in methods:
            raise SpecError("method", f"{self.method} does not apply to {self.task}; choose one of "
                            f"{', '.join(methods)}")
        if not self.base_model.strip():
            raise SpecError("base_model", "choose a base model")
        _within("lora_r", self.lora_r, 1)
        _within("lora_alpha", self.lora_alpha, 1)
        if not 0 <= self.lora_dropout < 1:
            raise SpecError("lora_dropout", "must be at least 0 and below 1")
        if self.method in ADAPTER_METHODS:
            if not self.lora_target_modules:
                raise SpecError("lora_target_modules", "choose at least one layer to adapt")
            odd = [name for name in self.lora_target_modules if not _MODULE_NAME.fullmatch(name)]
            if odd:
                raise SpecError("lora_target_modules", f"not a module name: {odd[0]!r}")
        if not self.dpo_beta > 0:
            raise SpecError("dpo_beta", "must be greater than 0")
        if not self.dpo_sft_weight >= 0:
            raise SpecError("dpo_sft_weight", "must be 0 (pure DPO) or more")
        if self.loss_on_turns not in LOSS_ON_TURNS:
            raise SpecError("loss_on_turns", f"choose one of {', '.join(LOSS_ON_TURNS)}")
        if not 0 <= self.replay_fraction <= MAX_REPLAY:
            raise SpecError("replay_fraction", f"must be at least 0 and at most {MAX_REPLAY}")
        if self.replay_fraction and self.task != "sft":
            raise SpecError("replay_fraction", "replay of general text applies to instruction tuning only")
        if not self.learning_rate > 0:
            raise SpecError("learning_rate", "must be greater than 0")
        if self.learning_rate >= 1:
            raise SpecError("learning_rate", "must be below 1 (typical: 2e-3 for LoRA, 5e-5 for full)")
        if self.max_steps is None and not self.epochs > 0:
            raise SpecError("epochs", "must be greater than 0")
        if not self.epochs <= LIMITS["epochs"]:
            raise SpecError("epochs", f"must be at most {LIMITS['epochs']}")
        if self.max_steps is not None:
            _within("max_steps", self.max_steps, 1)
        _within("batch_size", self.batch_size, 1)
        if self.task == "kto" and self.batch_size < 2:
            raise SpecError("batch_size", "KTO needs at least 2 rows a batch (each row's prompt is paired with "
                            "another row's completion to estimate how far the model has moved)")
        _within("max_seq_length", self.max_seq_length, 8)
        if not 0 <= self.validation_fraction < 1:
            raise SpecError("validation_fraction", "must be at least 0 and below 1")
        _at_least("eval_every", self.eval_every, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        if not self.checkpoint_minutes > 0:
            raise SpecError("checkpoint_minutes", "must be greater than 0")
        if not isinstance(self.gradient_checkpointing, bool):
            raise SpecError("gradient_checkpointing", "must be true or false")
        if not isinstance(self.drop_validation_overlap, bool):
            raise SpecError("drop_validation_overlap", "must be true or false")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting's default: the one place defaults are read from."""
        return {
            f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }

    @property
    def adapters(self) -> bool:
        """Whether this job trains LoRA adapters (and its artifact is an adapter for sft/dpo)."""
        return self.method in ADAPTER_METHODS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(unknown[0], "not a TrainSpec field")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))


@dataclass
class TrainSpec(TrainChoices):
    """The user's choices and where the worker runs them (keyword-only, after the choices)."""

    dataset_path: str = field(kw_only=True)
    """Normalised JSONL of the training rows (one object per line, canonical field names)."""
    output_dir: str = field(kw_only=True)
    """Where checkpoints and the final artifact are written."""
    validation_path: str = field(default="", kw_only=True)
    """Normalised JSONL of an uploaded validation file; when set, it is the held-out set and
    validation_fraction is ignored."""
    dataset_name: str = field(default="", kw_only=True)
    """The dataset's display name, for the model card."""
    job_id: int | None = field(default=None, kw_only=True)
    """The Job this spec belongs to, when run by the web app."""


_MODULE_NAME = re.compile(r"[A-Za-z_][\w.-]*")


LIMITS = {
    "epochs": 1000, "max_steps": 1_000_000, "batch_size": 4096, "max_seq_length": 131_072, "lora_r": 1024,
    "lora_alpha": 65_536,
}
"""The largest value each setting may take: beyond these a job is a typo or an attack, not a
fine-tune (the time limit, SPECIALIST_MAX_JOB_SECONDS, bounds the rest)."""


def _at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(name, "must be a whole number")
    if value < minimum:
        raise SpecError(name, f"must be at least {minimum}")


def _within(name: str, value: int, minimum: int) -> None:
    _at_least(name, value, minimum)
    if value > LIMITS[name]:
        raise SpecError(name, f"must be at most {LIMITS[name]:,}")


# Evaluation -----------------------------------------------------------------------------------


@dataclass
class EvalModel:
    """One model an evaluation scores (worker.evaluation): the base, or a job's fine-tune."""

    label: str
    """What the leaderboard calls it: "Base model", "Job 12: rewrites"."""
    spec: dict[str, Any]
    """The TrainSpec (as a dict) of the job it comes from; for the base, of the first job."""
    final_dir: str = ""
    """The fine-tune's folder (an adapter or a whole model); empty for the base."""
    job_id: int | None = None
    labels: list[str] = field(default_factory=list)
    """A classifier base's labels, in its job's order (its untrained head is the one measured at step 0)."""
    checkpoint_zip: str = ""
    """A checkpoint its job kept for download (worker.snapshots): unpacked into the evaluation's
    folder and scored as its final_dir."""
    step: int | None = None
    """The step of that checkpoint."""


@dataclass
class EvalSpec:
    """An evaluation of models on a test set of any task family: the contract between the web app
    and worker.evaluation, as TrainSpec is for training."""

    task: str
    dataset_path: str
    output_dir: str
    models: list[EvalModel]
    batch_size: int = 8
    max_seq_length: int = 512
    job_id: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:  # worker.evaluation scores every family
            raise SpecError("task", f"must be one of {', '.join(TASKS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**{**data, "models": [EvalModel(**m) for m in data["models"]]})
