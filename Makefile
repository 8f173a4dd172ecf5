# The README's two commands: `make demo` and `make test`.
# Both create .venv, install vmferry with every extra, and make sure QEMU is there;
# `make test` also needs QEMU 5.2, 10.0 and 11.1 (Debian bullseye, trixie and forky chroots, built once
# by `make qemu-releases`; `make qemu10` builds only 10.0's), libvirt (Debian's libvirtd and virsh,
# `make libvirt`), the Linux test guest (`make linux-guest`) and jq >= 1.7 (`make jq`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test qemu qemu-releases qemu10 libvirt linux-guest jq lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

qemu:
	@bash scripts/ensure-qemu.sh

qemu-releases:
	@for r in 5.2 10.0 11.1; do bash scripts/ensure-qemu-release.sh $$r || exit 1; done

qemu10:
	@bash scripts/ensure-qemu-release.sh 10.0

# libvirtd, virtlogd, virsh and the compressors, for the tests marked `libvirt`
libvirt:
	@bash scripts/ensure-libvirt.sh

# Debian's kernel and a busybox initramfs that counts on the serial console, for the Linux guest tests
linux-guest:
	@bash scripts/ensure-linux-guest.sh

# jq >= 1.7 for the jq pipeline test (the system's, or trixie's inside the QEMU 10.0 chroot)
jq: qemu10
	@bash scripts/ensure-jq.sh

demo: $(STAMP) qemu
	$(BIN)/python -m vmferry.cli.demo

test: $(STAMP) qemu qemu-releases libvirt linux-guest jq
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info
