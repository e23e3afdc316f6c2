# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use, at the versions pinned in
# requirements-lock.txt (pyproject.toml keeps ranges for `pip install vlm-adapters`).
# `make test-latest` runs the suite on the newest allowed releases in .venv-latest;
# `make lock` then writes those versions into the lock (see docs/contributing.md).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LOCK := requirements-lock.txt
PLUGINS := $(wildcard plugins/*/pyproject.toml)
TESTS := tests $(dir $(PLUGINS)) -q -p no:cacheprovider --import-mode=importlib
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-latest lock lint docs bench clean

# install(venv, pip options): the package with its dev and docs extras, then the example plugins
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet $(2) -e ".[dev,docs]"
	$(1)/bin/pip install --quiet --no-build-isolation $(2) $(foreach p,$(PLUGINS),-e $(dir $(p)))
endef

$(STAMP): pyproject.toml $(PLUGINS) $(LOCK)
	$(call install,$(VENV),--constraint $(LOCK))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlm-adapters demo --out runs/demo

test: $(STAMP) lint
	$(BIN)/python -m pytest $(TESTS)
	$(MAKE) docs

# A fresh environment with the newest releases pyproject.toml allows; the test header lists
# every version that differs from the lock.
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),--upgrade --upgrade-strategy eager)
	touch $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest $(TESTS)
	$(LATEST)/bin/mkdocs build --strict --quiet -d build/site-latest

# Pin what `make test-latest` installed and tested (run it first).
lock: $(LATEST)/.installed
	{ echo "# Resolved by \`make test-latest && make lock\` on $$(date -u +%F), Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -sm)."; \
	  echo "# Constraints for \`make demo\` and \`make test\`; pyproject.toml keeps the ranges users get."; \
	  $(LATEST)/bin/pip freeze --exclude-editable | LC_ALL=C sort -f; } > $(LOCK)

$(LATEST)/.installed:
	@echo "run \`make test-latest\` first: the lock pins what it tested" >&2; exit 2

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet -d build/site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(LATEST) build runs
