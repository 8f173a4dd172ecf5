# The README's two commands: `make demo` and `make test`.
# Both create .venv, install vmferry with every extra, and make sure QEMU is there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test qemu lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

qemu:
	@bash scripts/ensure-qemu.sh

demo: $(STAMP) qemu
	$(BIN)/python -m vmferry.demo

test: $(STAMP) qemu
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
