from django import forms

from webapp.datasets.models import Dataset
from worker.catalog import CATALOG, DEFAULT_BASE_MODEL, base_model_problem, catalog_for
from worker.spec import LORA_TARGETS, SpecError, TrainSpec

CUSTOM = "custom"
SPEC_FIELDS = (
    "method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
    "epochs", "max_steps", "batch_size", "max_seq_length", "validation_fraction",
)
_DEFAULTS = TrainSpec(base_model=DEFAULT_BASE_MODEL, dataset_path="", output_dir="")


def _base_model_choices() -> list[tuple[str, str]]:
    choices = [(m.key, f"{m.name} · {m.parameters / 1e6:.0f}M parameters") for m in catalog_for("causal-lm")]
    return [*choices, (CUSTOM, "Another model: a local directory or a Hugging Face Hub id")]


class JobForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional; named after the dataset if empty.")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none(), empty_label=None)
    base_model = forms.ChoiceField(choices=_base_model_choices, initial=DEFAULT_BASE_MODEL)
    custom_base_model = forms.CharField(required=False, label="Model directory or Hub id")
    method = forms.ChoiceField(
        choices=[("lora", "LoRA: train small adapters, base frozen"), ("full", "Full fine-tune: train every weight")],
        initial="lora", widget=forms.RadioSelect,
    )
    lora_r = forms.IntegerField(label="LoRA rank (r)", initial=_DEFAULTS.lora_r)
    lora_alpha = forms.IntegerField(label="LoRA alpha", initial=_DEFAULTS.lora_alpha)
    lora_dropout = forms.FloatField(label="LoRA dropout", initial=_DEFAULTS.lora_dropout)
    lora_target_modules = forms.MultipleChoiceField(
        label="Adapted layers", choices=[(t, t) for t in LORA_TARGETS], initial=list(LORA_TARGETS),
        widget=forms.CheckboxSelectMultiple, required=False,
    )
    learning_rate = forms.FloatField(initial=_DEFAULTS.learning_rate, help_text="2e-3 suits LoRA; use ~5e-5 for a full fine-tune.")
    epochs = forms.FloatField(initial=_DEFAULTS.epochs)
    max_steps = forms.IntegerField(
        required=False, initial=_DEFAULTS.max_steps, help_text="Stops training here; empty to train all epochs."
    )
    batch_size = forms.IntegerField(initial=_DEFAULTS.batch_size)
    max_seq_length = forms.IntegerField(label="Max sequence length (tokens)", initial=_DEFAULTS.max_seq_length)
    validation_fraction = forms.FloatField(initial=_DEFAULTS.validation_fraction)

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["dataset"].queryset = Dataset.objects.filter(owner=user, task="sft")

    def clean(self):
        data = super().clean()
        base = data.get("custom_base_model", "").strip() if data.get("base_model") == CUSTOM else data.get("base_model")
        problem = base_model_problem(base or "")
        if problem:
            self.add_error("custom_base_model" if data.get("base_model") == CUSTOM else "base_model", problem)
            return data
        if base in CATALOG and CATALOG[base].kind != "causal-lm":
            self.add_error("base_model", f"{CATALOG[base].name} is an encoder; instruction tuning needs a causal LM.")
        if self.errors:
            return data
        values = {f: data.get(f) for f in SPEC_FIELDS}
        try:
            self.spec = TrainSpec(base_model=base, dataset_path="", output_dir="", **values)
        except SpecError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.message)
        return data

    @staticmethod
    def initial_from(job) -> dict:
        """Form values that reproduce `job`'s settings."""
        spec = job.spec
        base = spec["base_model"]
        initial = {field: spec[field] for field in SPEC_FIELDS if field in spec}
        initial.update(dataset=job.dataset_id, name=f"{job.name} (again)")
        if base in CATALOG:
            initial["base_model"] = base
        else:
            initial.update(base_model=CUSTOM, custom_base_model=base)
        return initial

    def spec_dict(self) -> dict:
        spec = self.spec.to_dict()
        for runtime_field in ("dataset_path", "output_dir", "job_id"):
            spec.pop(runtime_field)
        spec["dataset_name"] = self.cleaned_data["dataset"].name
        return spec
