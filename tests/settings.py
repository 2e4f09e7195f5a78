"""Settings for the test run: the app's own, on a Redis database of the tests' own.

Also exported to the environment, so the server and worker processes that the end-to-end
tests start use the same isolation.
"""

import os

# Tests never touch a developer's Redis data or queues: database 15 is theirs.
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from webapp.settings import *  # noqa: E402, F403
