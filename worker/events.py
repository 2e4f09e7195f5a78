"""The Reporter: how a recipe tells the world what it is doing.

A recipe calls ``reporter.metric(step, loss=...)`` and friends; the Reporter stamps each event
(``{"kind", "step", "t", ...}``), queues it, and a background thread hands batches to a sink
(the worker's sink stores them in the database and appends them to the job's Redis stream).
The training thread never waits on I/O: an event costs a dict and a queue put.

The host sets ``stop_requested`` (a cancel, a lost lease) and recipes check it once per step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.errors import Cancelled

log = logging.getLogger(__name__)

EVENT_KINDS = ("state", "metric", "eval", "params", "log", "artifact")

Sink = Callable[[list[dict[str, Any]]], None]


def make_event(kind: str, step: int = 0, *, t: float | None = None, **data: Any) -> dict[str, Any]:
    """The one way an event is built, by a recipe's Reporter or by the web app (a job's states)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return {"kind": kind, "step": int(step), "t": round(time.time() if t is None else t, 3), **data}


class Reporter:
    """Collects events from a recipe and delivers them, in order, to a sink."""

    def __init__(self, sink: Sink | None = None, on_thread_exit: Callable[[], None] | None = None):
        self.sink = sink
        self.on_thread_exit = on_thread_exit
        self.stop_requested = threading.Event()
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._undelivered = 0
        self._delivered = threading.Condition()
        self._thread: threading.Thread | None = None
        if sink is not None:
            self._thread = threading.Thread(target=self._deliver, name="reporter", daemon=True)
            self._thread.start()

    # What recipes call -------------------------------------------------------------------
    def state(self, state: str, message: str = "", step: int = 0) -> None:
        self.emit("state", step, state=state, message=message)

    def metric(self, step: int, **values: float) -> None:
        self.emit("metric", step, **values)

    def eval(self, step: int, **values: Any) -> None:
        self.emit("eval", step, **values)

    def params(self, census: dict[str, Any]) -> None:
        self.emit("params", 0, **census)

    def log(self, message: str, step: int = 0) -> None:
        self.emit("log", step, message=message)

    def artifact(self, path: str, **info: Any) -> None:
        self.emit("artifact", 0, path=path, **info)

    def raise_if_stopped(self) -> None:
        """Between a recipe's phases: end the run (Cancelled) once the host asked it to stop."""
        if self.stop_requested.is_set():
            raise Cancelled("Training was stopped on request.")

    def emit(self, kind: str, step: int = 0, **data: Any) -> None:
        event = make_event(kind, step, **data)
        self.events.append(event)
        if self._thread is not None:
            with self._delivered:
                self._undelivered += 1
            self._queue.put(event)

    def flush(self, timeout: float) -> bool:
        """Wait until every event emitted so far has been handed to the sink; False if that took
        longer than `timeout` seconds."""
        with self._delivered:
            return self._delivered.wait_for(lambda: self._undelivered == 0, timeout)

    # Delivery ----------------------------------------------------------------------------
    def close(self) -> None:
        """Deliver everything still queued, then stop the delivery thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _deliver(self) -> None:
        try:
            self._deliver_until_closed()
        finally:
            if self.on_thread_exit is not None:
                self.on_thread_exit()

    def _deliver_until_closed(self) -> None:
        # Send whatever is queued as one batch: no waiting to fill a batch (latency), and
        # while a send is in flight new events pile up into the next one (throughput).
        done = False
        while not done:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            batch = [event for event in batch if event is not None]
            if batch:
                self._send(batch)
                with self._delivered:
                    self._undelivered -= len(batch)
                    self._delivered.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(5):
            try:
                self.sink(batch)
                return
            except Exception:
                log.exception("event delivery failed (attempt %d); retrying", attempt + 1)
                time.sleep(min(2**attempt, 10))
        log.error("dropped %d events after repeated delivery failures", len(batch))

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
