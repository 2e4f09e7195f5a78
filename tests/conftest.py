pytest_plugins = ["tests.support.model_fixtures", "tests.support.stack", "tests.support.redis_server", "tests.support.web_fixtures"]
