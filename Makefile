# The README's two commands: `make demo` and `make test`.
# Both create .venv, install vmferry with every extra, and make sure QEMU is there;
# `make test` also needs QEMU 10.0 (a Debian trixie chroot, built once by `make qemu10`) and libvirt
# (Debian's libvirtd and virsh, `make libvirt`) and jq >= 1.7 (`make jq`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test qemu qemu10 libvirt jq lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

qemu:
	@bash scripts/ensure-qemu.sh

qemu10:
	@bash scripts/ensure-qemu10.sh

# libvirtd, virtlogd, virsh and the compressors, for the tests marked `libvirt`
libvirt:
	@bash scripts/ensure-libvirt.sh

# jq >= 1.7 for the jq pipeline test (the system's, or trixie's inside the QEMU 10.0 chroot)
jq: qemu10
	@bash scripts/ensure-jq.sh

demo: $(STAMP) qemu
	$(BIN)/python -m vmferry.cli.demo

test: $(STAMP) qemu qemu10 libvirt jq
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
