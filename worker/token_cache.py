"""Tokenised datasets, kept between jobs: a second job on the same file and tokenizer skips tokenising.

Rendering a row through a chat template and tokenising it twice (prompt, and prompt + reply)
costs about a millisecond; a 20 000-row dataset takes half a minute before the first step.
The cache key is the SHA-256 of the dataset file's bytes, the tokenizer (its full serialised
form, special tokens and chat template), the maximum length and the version of the rendering
code; anything that changes the tokens changes the key. Entries are plain JSON (never pickle),
written atomically, and the oldest are removed beyond MAX_ENTRIES.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.models import model_cache_dir

MAX_ENTRIES = 32


def cache_dir() -> Path:
    """$SPECIALIST_TOKEN_CACHE, default a `tokenized` folder beside the model cache."""
    return Path(os.environ.get("SPECIALIST_TOKEN_CACHE") or model_cache_dir().parent / "tokenized")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about `tokenizer` that decides the tokens of a rendered row."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()


def cache_key(dataset: Path, tokenizer, max_length: int, version: str) -> str:
    digest = hashlib.sha256()
    with open(dataset, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    parts = [digest.hexdigest(), tokenizer_fingerprint(tokenizer), str(max_length), version]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached(key: str, compute: Callable[[], list[Any]]) -> tuple[list[Any], bool]:
    """(the value stored under `key`, True), or (compute(), False) after storing it."""
    path = cache_dir() / f"{key}.json"
    try:
        value = json.loads(path.read_text())
        os.utime(path)  # recently used: pruned last
        return value, True
    except (OSError, ValueError):
        pass  # absent, or a damaged entry: compute it again
    value = compute()
    _store(path, value)
    return value, False


def _store(path: Path, value: list[Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as staging:
            json.dump(value, staging, separators=(",", ":"))
        os.replace(staging.name, path)
        _prune(path.parent)
    except OSError:
        pass  # a read-only or full disk costs only the next job's tokenising time


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[MAX_ENTRIES:]:
        stale.unlink(missing_ok=True)
