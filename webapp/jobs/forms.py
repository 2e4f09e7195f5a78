"""The new-job form: the user's TrainChoices, validated where the user can see it.

The dataset decides the task; the base model must be able to serve it; every number is
checked by TrainChoices itself, and its complaint is shown on the field it names.
"""

import itertools

from django import forms
from django.conf import settings

from webapp.datasets.models import READY, Dataset
from webapp.jobs.models import JOB_BASE_PREFIX, Job
from webapp.jobs.workers import live_capabilities, supported
from worker.catalog import CATALOG, DEFAULT_BASE_MODEL, base_model_problem
from worker.families import FAMILIES
from worker.spec import ALL_LINEAR, LORA_TARGETS, SpecError, TrainChoices

CUSTOM = "custom"
SPEC_FIELDS = (
    "method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "learning_rate",
    "epochs", "max_steps", "batch_size", "max_seq_length", "validation_fraction", "dpo_beta",
    "dpo_sft_weight", "gradient_checkpointing", "loss_on_turns", "drop_validation_overlap", "replay_fraction",
)
_DEFAULTS = TrainChoices.defaults()
METHODS = [
    ("lora", "LoRA: train small adapters, base frozen"),
    ("qlora", "QLoRA: LoRA on a base loaded in 4 bits (less GPU memory)"),
    ("full", "Full fine-tune: train every weight"),
    ("head", "Trained head: the whole base frozen, only the task head learns"),
]

# Settings that only some workers can run: offered while a live worker reports the feature.
GATED = {
    "qlora": "QLoRA needs a training worker with a CUDA GPU and the bitsandbytes package",
    "gradient_checkpointing": "Gradient checkpointing needs a training worker that reports support for it",
}
GATED_CHOICES = (("qlora", "method", "qlora"), ("gradient_checkpointing", "gradient_checkpointing", True))
SWEPT_NUMBERS = {"learning_rate": float, "lora_r": int, "max_steps": int}
"""Settings a sweep tries several values of (and the method); each run is one job of a group."""
MAX_SWEEP_VALUES = 4
MAX_RUNS = 12


def _base_model_choices(own_models: list[Job] = ()) -> list:
    """The catalog, the user's own trained models (by job) and "another model", grouped."""
    catalog = [(m.key, f"{m.name} · {m.parameters / 1e6:.0f}M parameters · {m.kind}") for m in CATALOG.values()]
    groups = [("Catalog", catalog)]
    if own_models:
        groups.append(("Your models", [
            (f"{JOB_BASE_PREFIX}{job.id}", f"Job {job.id}: {job.name} · {FAMILIES[job.spec.get('task', 'sft')].name}")
            for job in own_models
        ]))
    return [*groups, ("Elsewhere", [(CUSTOM, "Another model: a folder the administrator registered, or a Hub id")])]


class DatasetChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, dataset):
        validation = f" + {dataset.validation_rows_ok} validation rows" if dataset.has_validation else ""
        return f"{dataset.name} · {FAMILIES[dataset.task].name} · {dataset.rows_ok} rows{validation}"


class JobForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional; named after the dataset if empty.")
    dataset = DatasetChoiceField(queryset=Dataset.objects.none(), empty_label=None,
                                 help_text="The dataset decides the task. Only datasets that are ready are listed.")
    base_model = forms.ChoiceField(choices=_base_model_choices, initial=DEFAULT_BASE_MODEL)
    custom_base_model = forms.CharField(
        required=False, label="Model folder or Hub id",
        help_text="A model folder registered on this server (SPECIALIST_MODEL_DIRS), or a Hugging Face Hub id "
                  "in the server's cache.",
    )
    method = forms.ChoiceField(choices=METHODS, initial="lora", widget=forms.RadioSelect)
    lora_r = forms.IntegerField(label="LoRA rank (r)", initial=_DEFAULTS["lora_r"])
    lora_alpha = forms.IntegerField(label="LoRA alpha", initial=_DEFAULTS["lora_alpha"])
    lora_dropout = forms.FloatField(label="LoRA dropout", initial=_DEFAULTS["lora_dropout"])
    lora_target_modules = forms.MultipleChoiceField(
        label="Adapted layers", initial=list(LORA_TARGETS), widget=forms.CheckboxSelectMultiple, required=False,
        choices=[(t, t) for t in LORA_TARGETS] + [(ALL_LINEAR, "every linear layer (any architecture)")],
        help_text="Encoders (MiniLM) always adapt every linear layer.",
    )
    use_dora = forms.BooleanField(label="DoRA (weight-decomposed LoRA)", required=False)
    learning_rate = forms.FloatField(initial=_DEFAULTS["learning_rate"])
    epochs = forms.FloatField(initial=_DEFAULTS["epochs"])
    max_steps = forms.IntegerField(
        required=False, initial=_DEFAULTS["max_steps"], help_text="Stops training here; empty to train all epochs."
    )
    batch_size = forms.IntegerField(initial=_DEFAULTS["batch_size"])
    gradient_checkpointing = forms.BooleanField(
        required=False, help_text="Recompute activations instead of keeping them: less memory, about a third slower.",
    )
    max_seq_length = forms.IntegerField(label="Max sequence length (tokens)", initial=_DEFAULTS["max_seq_length"])
    validation_fraction = forms.FloatField(
        initial=_DEFAULTS["validation_fraction"], help_text="Ignored when the dataset has its own validation file."
    )
    drop_validation_overlap = forms.BooleanField(
        label="Drop the validation file's inputs from training", required=False,
        help_text="Training rows whose input a validation row also has are left out, so the held-out metrics "
                  "measure generalisation, not memory (the dataset page counts them).",
    )
    dpo_beta = forms.FloatField(label="Beta (DPO, KTO)", initial=_DEFAULTS["dpo_beta"], required=False,
                                help_text="Preference tuning only: higher stays closer to the base model.")
    dpo_sft_weight = forms.FloatField(
        label="Chosen-reply weight (RPO)", initial=_DEFAULTS["dpo_sft_weight"], required=False,
        help_text="Preference tuning only: also learn to write the chosen replies. 0 is pure DPO, which learns "
                  "to rank the pair but barely changes what the model writes.",
    )

    loss_on_turns = forms.ChoiceField(
        label="Loss on", initial=_DEFAULTS["loss_on_turns"], required=False,
        choices=[("all", "every assistant turn"), ("last", "the last assistant turn only")],
        help_text="Instruction tuning on conversations: which replies the model learns to write; "
                  "the other turns are context.",
    )

    replay_fraction = forms.FloatField(
        label="General-text replay", initial=_DEFAULTS["replay_fraction"], required=False,
        help_text="Instruction tuning: the share of training rows that are general text (0 to 0.5), so the model "
                  "forgets less of what the base knew; the job page's forgetting chart shows the effect. 0 is none.",
    )

    sweep_learning_rate = forms.CharField(
        label="Learning rates", required=False, help_text="2 to 4 values, such as 1e-3, 2e-3, 5e-3.")
    sweep_lora_r = forms.CharField(label="LoRA ranks", required=False, help_text="Such as 4, 8, 16.")
    sweep_max_steps = forms.CharField(label="Max steps", required=False, help_text="Such as 30, 60.")
    sweep_method = forms.MultipleChoiceField(
        label="Methods", required=False, widget=forms.CheckboxSelectMultiple,
        choices=[(key, label.split(":")[0]) for key, label in METHODS],
        help_text="Each method with its suggested learning rate, unless learning rates are swept too.",
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.runs: list[tuple[dict, TrainChoices]] = []
        """(the swept values, the run's choices) of each job to start: one without a sweep."""
        self.fields["dataset"].queryset = Dataset.objects.filter(owner=user, status=READY)
        self.own_models = {f"{JOB_BASE_PREFIX}{job.id}": job for job in Job.models_of(user)}
        self.fields["base_model"].choices = _base_model_choices(list(self.own_models.values()))
        # What the running training workers can do: the page offers only that (see worker.capabilities).
        workers = live_capabilities()
        self.offers = {feature: supported(feature, workers) for feature in GATED}
        self.devices = sorted({worker.get("device", "?") for worker in workers})
        if not self.offers["qlora"]:
            self.fields["method"].widget.choices = [c for c in METHODS if c[0] != "qlora"]
            self.fields["sweep_method"].choices = [c for c in self.fields["sweep_method"].choices if c[0] != "qlora"]

    def clean(self):
        data = super().clean()
        self._check_active_jobs()
        dataset = data.get("dataset")
        base = self._check_base_model(data, dataset)
        if self.errors or dataset is None:
            return data
        for feature, field_name, wanted in GATED_CHOICES:
            if data.get(field_name) == wanted and not self.offers[feature]:
                self.add_error(field_name, self._unsupported(feature))
        if not self.errors:
            self._validate_choices(data, dataset, base)
        if not self.errors:
            self._plan_runs(data, dataset)
        return data

    def _plan_runs(self, data: dict, dataset: Dataset) -> None:
        """self.runs: the one job, or every combination of the swept values, each validated."""
        swept: dict[str, list] = {}
        for name, kind in SWEPT_NUMBERS.items():
            values = self._swept_values(f"sweep_{name}", data.get(f"sweep_{name}") or "", kind)
            if values:
                swept[name] = values
        methods = data.get("sweep_method") or []
        if len(methods) == 1:
            self.add_error("sweep_method", "Choose two methods or more to compare them, or none.")
        elif methods:
            swept["method"] = methods
        if self.errors:
            return
        if not swept:
            self.runs = [({}, self.choices)]
            return
        count = 1
        for values in swept.values():
            count *= len(values)
        if count > MAX_RUNS:
            raise forms.ValidationError(f"The sweep makes {count} runs; at most {MAX_RUNS} are started at once. "
                                        "Sweep fewer values.")
        active = Job.objects.filter(owner=self.user, state__in=Job.ACTIVE_STATES).count()
        if active + count > settings.MAX_ACTIVE_JOBS_PER_USER:
            raise forms.ValidationError(
                f"The sweep's {count} runs and your {active} queued or running jobs are more than the "
                f"{settings.MAX_ACTIVE_JOBS_PER_USER} one person may have at once.")
        family = FAMILIES[dataset.task]
        for combination in itertools.product(*swept.values()):
            values = dict(zip(swept, combination, strict=True))
            choices = {**self.choices.to_dict(), **values}
            if "method" in values and "learning_rate" not in values:
                choices["learning_rate"] = family.suggested.learning_rates.get(values["method"], choices["learning_rate"])
            if values.get("method") == "qlora" and not self.offers["qlora"]:
                self.add_error("sweep_method", self._unsupported("qlora"))
                return
            try:
                self.runs.append((values, TrainChoices(**choices)))
            except SpecError as exc:
                field = f"sweep_{exc.field}" if f"sweep_{exc.field}" in self.fields and exc.field in values else None
                self.add_error(field, f"The run with {describe_run(values)}: {exc.message}")
                return

    def _swept_values(self, field: str, text: str, kind: type) -> list:
        if not text.strip():
            return []
        try:
            values = [kind(part) for part in text.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            self.add_error(field, "Give numbers separated by commas, such as 1e-3, 2e-3, 5e-3.")
            return []
        if not 2 <= len(values) <= MAX_SWEEP_VALUES or len(set(values)) < len(values):
            self.add_error(field, f"Give 2 to {MAX_SWEEP_VALUES} different values, or leave it empty.")
            return []
        return values

    def _check_active_jobs(self) -> None:
        active = Job.objects.filter(owner=self.user, state__in=Job.ACTIVE_STATES).count()
        if active >= settings.MAX_ACTIVE_JOBS_PER_USER:
            raise forms.ValidationError(
                f"You have {active} jobs queued or running, the most one person may have at once on this server. "
                "Wait for one to finish, or cancel one, then start this one."
            )

    def _check_base_model(self, data: dict, dataset: Dataset | None) -> str | None:
        """The base model named (a catalog key, `job:<id>`, or the custom field's text); an error on
        the field that names it when it may not be used, or cannot learn the dataset's family."""
        custom = data.get("base_model") == CUSTOM
        base = (data.get("custom_base_model") or "").strip() if custom else data.get("base_model")
        base_field = "custom_base_model" if custom else "base_model"
        problem = None if base in self.own_models else base_model_problem(
            base or "", model_dirs=settings.MODEL_DIRS, forbidden=[settings.MEDIA_ROOT]
        )
        kind = self._base_kind(base)
        if problem:
            self.add_error(base_field, problem)
        elif dataset and kind and kind not in FAMILIES[dataset.task].base_kinds:
            family = FAMILIES[dataset.task]
            self.add_error(base_field, f"{self._base_name(base)} is a {kind} model; {family.name.lower()} "
                                       f"needs a {' or '.join(family.base_kinds)} model.")
        return base

    def _validate_choices(self, data: dict, dataset: Dataset, base: str) -> None:
        """self.choices, or TrainChoices' complaint on the field it names."""
        values = {f: data.get(f) for f in SPEC_FIELDS}
        for optional in ("dpo_beta", "dpo_sft_weight", "loss_on_turns", "replay_fraction"):
            if values[optional] in (None, ""):
                values[optional] = _DEFAULTS[optional]
        if dataset.task != "sft":
            values["replay_fraction"] = 0.0  # the field is shown for instruction tuning only
        if self._base_kind(base) == "encoder":
            values["lora_target_modules"] = [ALL_LINEAR]
        try:
            self.choices = TrainChoices(base_model=base, task=dataset.task, **values)
        except SpecError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.message)

    def _base_kind(self, base: str | None) -> str | None:
        if base in CATALOG:
            return CATALOG[base].kind
        return self.own_models[base].base_kind() if base in self.own_models else None

    def _base_name(self, base: str) -> str:
        return CATALOG[base].name if base in CATALOG else f"Job {self.own_models[base].id}'s model"

    def _unsupported(self, feature: str) -> str:
        running = f"the running ones have: {', '.join(self.devices)}" if self.devices else "none is running"
        return f"{GATED[feature]}; {running}. Choose another setting, or start such a worker."

    @staticmethod
    def initial_from(job) -> dict:
        """Form values that reproduce `job`'s settings."""
        spec = job.spec
        base = spec["base_model"]
        initial = {field: spec[field] for field in SPEC_FIELDS if field in spec}
        initial.update(dataset=job.dataset_id, name=f"{job.name} (again)")
        if base in CATALOG or base.startswith(JOB_BASE_PREFIX):
            initial["base_model"] = base
        else:
            initial.update(base_model=CUSTOM, custom_base_model=base)
        return initial

    def spec_dict(self, choices: TrainChoices | None = None) -> dict:
        """What the job stores: the user's choices (or one run's) and the dataset it trains on
        (Job.train_spec adds where the worker runs it)."""
        dataset = self.cleaned_data["dataset"]
        validation = str(dataset.validation_rows_path) if dataset.has_validation else ""
        return {**(choices or self.choices).to_dict(), "dataset_name": dataset.name, "validation_path": validation}


def describe_run(values: dict) -> str:
    """A sweep run's swept values in words: "learning_rate 0.002, lora_r 8"."""
    return ", ".join(f"{name} {value}" for name, value in values.items())
