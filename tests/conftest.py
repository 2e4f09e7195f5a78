pytest_plugins = ["tests.model_fixtures", "tests.stack", "tests.web_fixtures"]
