# The two quick-start commands: `make demo` and `make test`. Both set up what is missing first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
E2E     := client-vscode/scripts

.PHONY: setup demo test test-python test-client test-e2e bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/star demo

test: setup test-python test-client test-e2e

test-python: setup
	$(BIN)/python -m pytest -ra

test-client:
	bash $(E2E)/unit.sh

test-e2e: setup
	bash $(E2E)/e2e.sh

bench: setup
	$(BIN)/star bench --data ../shared/data/conala/dev.jsonl --limit 50 --out bench-out/conala

clean:
	rm -rf $(VENV) build *.egg-info
