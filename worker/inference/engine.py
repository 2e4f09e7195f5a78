"""The engine: the one thread that runs the models, and the work the server hands it.

Every model call happens on this thread, so loading, attaching, evicting and generating never
race. The HTTP server puts work in `inbox` and gets results back through the callbacks in it.
Each turn of the loop takes what has arrived (an encoder request is answered at once; a chat
request joins its model's batch), then gives every model with replies in flight one step
(chat.py). While nothing is in flight the thread sleeps on the inbox.

A model that fails to load answers that request with a clear error; the others keep being served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.errors import UserError
from worker.inference.chat import BASE_ADAPTER, CausalModel, Reply
from worker.inference.encoders import Encoder, label_names
from worker.inference.requests import BadRequest, ChatRequest, Target
from worker.inference.resident import Resident

log = logging.getLogger(__name__)


@dataclass
class ChatWork:
    target: Target
    request: ChatRequest
    emit: Callable[[str, str | None], None]
    started: Callable[[Reply], None]
    """Called once the reply is in its model's batch (its prompt and generated tokens are counted)."""
    fail: Callable[[BadRequest], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class EncodeWork:
    target: Target
    method: str
    """embed, scores or probabilities (encoders.Encoder)."""
    args: tuple
    done: Callable[[Any], None]
    fail: Callable[[BadRequest], None]


class Engine:
    def __init__(self, resident: Resident, device: str | None = None):
        self.resident = resident
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # On a CPU, decoding is bound by reading the weights and fp32 is fastest (generation.py).
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.inbox: queue.Queue = queue.Queue()
        self.causal: dict[str, CausalModel] = {}
        self.encoders: dict[str, Encoder] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(None)

    def submit(self, work: ChatWork | EncodeWork) -> None:
        self.inbox.put(work)

    # Load figures --------------------------------------------------------------------------
    def in_flight(self) -> int:
        return sum(len(m.batch.replies) + len(m.waiting) for m in self.causal.values()) + self.inbox.qsize()

    def holds(self) -> list[str]:
        """The folders (and catalog keys) resident here: the web app routes to a server holding one."""
        return [key.split(":", 1)[1] for key in self.resident.entries]

    # The loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping.is_set():
            busy = [m for m in self.causal.values() if m.in_use()]
            for work in self._arrivals(block=not busy):
                self._take(work)
            for model in [m for m in self.causal.values() if m.in_use()]:
                try:
                    model.turn()
                except Exception as exc:  # a broken model must not take the server down
                    log.exception("generation failed on %s", model.path)
                    self._abort(model, f"Generation failed: {exc}")

    def _arrivals(self, block: bool) -> list:
        items = []
        try:
            items.append(self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return [item for item in items if item is not None]

    def _take(self, work: ChatWork | EncodeWork) -> None:
        try:
            if isinstance(work, ChatWork):
                self._start_reply(work)
            else:
                work.done(self._encode(work))
        except BadRequest as exc:
            work.fail(exc)
        except UserError as exc:
            work.fail(BadRequest(str(exc), "model", status=503, code="model_unavailable"))
        except Exception as exc:
            log.exception("request on %s failed", work.target.name)
            work.fail(BadRequest(f"The inference server could not run this model: {type(exc).__name__}: {exc}",
                                 "model", status=500, code="internal_error"))

    def _start_reply(self, work: ChatWork) -> None:
        if work.cancelled.is_set():
            return
        model, adapter = self._causal_for(work.target)
        prompt, max_new = model.prompt_ids(work.request)
        reply = Reply(prompt, adapter, work.request, max_new, work.emit, work.cancelled)
        model.add(reply)
        work.started(reply)

    def _abort(self, model: CausalModel, message: str) -> None:
        for reply in [*model.batch.replies, *model.waiting]:
            reply.emit(message, "error")
            reply.cancelled.set()
        model.batch.select([])
        model.waiting = []

    def _encode(self, work: EncodeWork):
        target = work.target
        if target.kind == "rerank" and not (target.adapter or target.model):
            # A base alone ranks by its embeddings' cosine similarity.
            encoder, _ = self._encoder_for(Target(target.name, "embed", target.base))
            (query, *documents), tokens = encoder.run(None, "embed", [work.args[0], *work.args[1]])
            query = torch.tensor(query)
            scores = torch.nn.functional.cosine_similarity(query[None], torch.tensor(documents)).tolist()
            return scores, tokens
        encoder, adapter = self._encoder_for(target)
        result = encoder.run(adapter, work.method, *work.args)
        if target.kind == "classify":
            return (*result, label_names(encoder))
        return result

    # Loading -------------------------------------------------------------------------------
    def _causal_for(self, target: Target) -> tuple[CausalModel, str]:
        """The loaded model a chat target runs on, and the adapter name of its rows."""
        if target.kind != "chat":
            raise BadRequest(f"{target.name} is not a chat model.", "model")
        folder = target.model or _resolve(target.base)
        key = f"base:{folder}"
        model = self.causal.get(key)
        if model is None:
            self.resident.make_room(_folder_bytes(folder))
            model = CausalModel(folder, self.dtype, self.device)
            self.causal[key] = model
            self.resident.add(key, "base", model.size, lambda: self.causal.pop(key, None), model.in_use)
        self.resident.touch(key)
        if target.model or not target.adapter:
            return model, BASE_ADAPTER
        return model, self._attach(key, model, target.adapter)

    def _encoder_for(self, target: Target) -> tuple[Encoder, str | None]:
        folder = target.model or _resolve(target.base)
        head = f":{'|'.join(target.labels)}:{target.seed}" if target.kind == "classify" and not target.model else ""
        key = f"{target.kind}:{folder}{head}"
        encoder = self.encoders.get(key)
        if encoder is None:
            self.resident.make_room(_folder_bytes(folder))
            encoder = Encoder(target.kind, folder, target.labels, target.seed, self.device)
            self.encoders[key] = encoder
            self.resident.add(key, "base", encoder.size, lambda: self.encoders.pop(key, None), lambda: False)
        self.resident.touch(key)
        if target.model or not target.adapter:
            return encoder, None
        self._attach(key, encoder, target.adapter)
        return encoder, target.adapter

    def _attach(self, parent: str, model: CausalModel | Encoder, folder: str) -> str:
        key = f"adapter:{folder}"
        if key in self.resident and folder in model.adapters:
            self.resident.touch(key)
            return model.adapters[folder]
        self.resident.make_room(_folder_bytes(folder), keep={parent})
        started = time.perf_counter()
        name, size = model.attach(folder)
        in_use = (lambda: model.adapter_in_use(folder)) if isinstance(model, CausalModel) else (lambda: False)
        self.resident.add(key, "adapter", size, lambda: model.detach(folder), in_use, parent=parent)
        log.info("attached %s in %.0f ms", folder, (time.perf_counter() - started) * 1000)
        return name


def _resolve(base: str) -> str:
    """A catalog key's folder (converted once, as for training), or the folder itself."""
    from worker.models import resolve_base

    return resolve_base(base)


def _folder_bytes(folder: str) -> int:
    """What loading a folder will take, from its weight files (fp32 in memory as on disk)."""
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
