import os

# Tests never touch a developer's Redis data or queues: database 15 is theirs.
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.model_fixtures", "tests.stack", "tests.web_fixtures"]
