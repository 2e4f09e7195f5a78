"""A training worker whose first training step runs out of memory (a simulated OOM).

Test-only: `python tests/support/oom_worker.py worker -Q train ...` patches Trainer.training_step in
this process, then runs the ordinary Celery worker."""

import os
import sys

import torch
import transformers

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
sys.path.insert(0, os.getcwd())

from webapp.celery import app  # noqa: E402

original_step = transformers.Trainer.training_step
raised = []


def training_step(self, *args, **kwargs):
    if not raised:
        raised.append(True)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the test)")
    return original_step(self, *args, **kwargs)


transformers.Trainer.training_step = training_step
app.worker_main(sys.argv[1:])
