"""What the inference server holds in memory: loaded models and attached adapters, kept by an
LRU within a memory budget, and counted each time one is loaded (the tests and the benchmark
read the counters to see that a base was loaded once).

An entry is evicted only when it is not in use (no request of its own is being answered); an
evicted base takes its adapters with it. What is evicted is loaded again on the next request
that needs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.inference.requests import BadRequest

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def budget_from_environment() -> int:
    """SPECIALIST_INFERENCE_MEMORY_MB (default 8192): the bytes of weights the server may hold."""
    return int(os.environ.get("SPECIALIST_INFERENCE_MEMORY_MB", 8192)) * MIB


@dataclass
class Entry:
    key: str
    kind: str
    """base or adapter (a whole model counts as a base)."""
    size: int
    unload: Callable[[], None]
    in_use: Callable[[], bool]
    parent: str | None = None
    children: set[str] = field(default_factory=set)


class Resident:
    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.loads: Counter[str] = Counter()
        """How many times each key was loaded (a base loaded once shows 1)."""
        self.evictions = 0

    @property
    def used(self) -> int:
        return sum(entry.size for entry in self.entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def touch(self, key: str) -> None:
        """Mark `key` (and its parent) as just used."""
        entry = self.entries.get(key)
        if entry is None:
            return
        if entry.parent in self.entries:
            self.entries.move_to_end(entry.parent)
        self.entries.move_to_end(key)

    def make_room(self, size: int, keep: set[str] = frozenset()) -> None:
        """Evict least recently used entries (not in use, not in `keep`) until `size` more bytes fit."""
        if size > self.budget:
            raise BadRequest(f"This model needs {size / MIB:.0f} MiB of memory; the inference server's budget is "
                             f"{self.budget / MIB:.0f} MiB (SPECIALIST_INFERENCE_MEMORY_MB).", "model", status=503,
                             code="memory_budget")
        for key in list(self.entries):
            if self.used + size <= self.budget:
                return
            if key in self.entries and key not in keep and self._evictable(key, keep):
                self.evict(key)
        if self.used + size > self.budget:
            raise BadRequest("The inference server's memory budget is full with models that are answering "
                             "requests; try again in a moment.", "model", status=503, code="memory_budget")

    def _evictable(self, key: str, keep: set[str]) -> bool:
        entry = self.entries[key]
        return not entry.in_use() and not (entry.children & keep) and not any(
            self.entries[child].in_use() for child in entry.children if child in self.entries)

    def add(self, key: str, kind: str, size: int, unload: Callable[[], None], in_use: Callable[[], bool],
            parent: str | None = None) -> None:
        self.entries[key] = Entry(key, kind, size, unload, in_use, parent)
        if parent is not None:
            self.entries[parent].children.add(key)
        self.loads[key] += 1

    def evict(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        for child in list(entry.children):
            self.evict(child)
        if entry.parent in self.entries:
            self.entries[entry.parent].children.discard(key)
        entry.unload()
        self.evictions += 1
        log.info("evicted %s (%s, %.1f MiB)", key, entry.kind, entry.size / MIB)

    def summary(self) -> dict:
        return {
            "budget_mib": round(self.budget / MIB, 1),
            "used_mib": round(self.used / MIB, 1),
            "resident": [{"key": e.key, "kind": e.kind, "mib": round(e.size / MIB, 2)} for e in self.entries.values()],
            "loads": dict(self.loads),
            "evictions": self.evictions,
        }


def tensor_bytes(module) -> int:
    """The bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_name(folder: str) -> str:
    """The name an adapter folder goes by inside a peft model (a module key: no dots)."""
    return "a_" + hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
