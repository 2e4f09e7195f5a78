pytest_plugins = ["tests.model_fixtures", "tests.stack", "tests.redis_server", "tests.web_fixtures"]
