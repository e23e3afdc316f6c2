# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev,docs]"
	$(BIN)/pip install --quiet --no-build-isolation $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlm-adapters demo --out runs/demo

test: $(STAMP) lint
	$(BIN)/python -m pytest tests $(dir $(PLUGINS)) -q -p no:cacheprovider --import-mode=importlib
	$(MAKE) docs

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet -d build/site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build runs
