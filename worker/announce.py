"""A training worker announces what it can run, for the new-job form.

A training worker imports this module (``celery worker -I worker.announce``, as ``manage.py
serve`` starts it). When the worker is ready, a background thread detects the hardware (CUDA,
bf16, bitsandbytes, the device's name) and keeps its record in Redis (worker.capabilities), and
the web app offers QLoRA or gradient checkpointing only when a live worker can run them.
Detecting imports torch and the SFT recipe, so the worker's first job starts warm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from worker.capabilities import RENEW_SECONDS, key, publish

log = logging.getLogger(__name__)


def detect() -> dict[str, Any]:
    """This machine's training capabilities (imports torch and the SFT recipe)."""
    from worker.run import TRAINING_IMPORTS, load_recipe

    with TRAINING_IMPORTS:
        import torch

        from worker.hardware import bf16_supported
        from worker.models import qlora_problem
    load_recipe("sft")  # imported now, so that the worker's first job starts warm

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "bf16": bf16_supported(),
        "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        "qlora": not qlora_problem(),
        "gradient_checkpointing": True,  # torch.utils.checkpoint runs on every device
    }


class Publisher:
    """Detects once, then keeps this worker's record alive until the worker stops."""

    def __init__(self, redis_url: str, worker_name: str):
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.worker_name = worker_name
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="capabilities", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):  # if Redis is away, the record expires on its own
            self.client.delete(key(self.worker_name))

    def _run(self) -> None:
        capabilities = detect()
        log.info("worker capabilities: %s", capabilities)
        while not self.stopped.is_set():
            try:
                publish(self.client, self.worker_name, capabilities)
            except redis.RedisError as exc:
                log.warning("could not publish the worker's capabilities: %s", exc)
            self.stopped.wait(RENEW_SECONDS)


_publisher: Publisher | None = None


@worker_ready.connect
def _start_publishing(sender, **kwargs) -> None:
    global _publisher
    _publisher = Publisher(sender.app.conf.broker_url, sender.hostname)
    _publisher.start()


@worker_shutdown.connect
def _stop_publishing(sender=None, **kwargs) -> None:
    if _publisher is not None:
        _publisher.stop()
