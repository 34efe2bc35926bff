#!/usr/bin/env bash
# Correctness smoke test of subspace_jax on aarch64 (Raspberry Pi class CPUs) under qemu
# user-mode emulation: builds an arm64 Debian sysroot with CPython 3.11 and the project's
# aarch64 wheels (once, cached), then runs scripts/aarch64_smoke.py (core transforms, WASI +
# LoRA-Pre, NSN, LittleBit-2 packed inference) there and natively and compares every printed
# number within float32 tolerance. Emulation is ~150-450x slower: correctness only, no timings.
# Needs root (apt-get) and the package registries. Usage: bash scripts/aarch64_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${SUBSPACE_JAX_ARM_ROOT:-$HOME/.cache/subspace_jax/aarch64}
SYSROOT=$ROOT/sysroot
SITE=$SYSROOT/opt/armsite
PY=${PYTHON:-.venv/bin/python}

setup() {
  if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    echo "== building arm64 sysroot in $SYSROOT"
    command -v qemu-aarch64-static >/dev/null || { apt-get update -qq; apt-get install -y -qq qemu-user-static; }
    dpkg --print-foreign-architectures | grep -q arm64 || dpkg --add-architecture arm64
    apt-get update -qq
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances python3.11:arm64 | grep -E '^[a-z0-9.+-]+:arm64$' | sort -u)
    mkdir -p "$ROOT/debs" "$SYSROOT"
    (cd "$ROOT/debs" && apt-get download $pkgs libstdc++6:arm64 media-types >/dev/null)
    for d in "$ROOT"/debs/*.deb; do dpkg-deb -x "$d" "$SYSROOT"; done
  fi
  if [ ! -d "$SITE/jax" ]; then
    echo "== installing aarch64 wheels into $SITE"
    "$PY" -m pip install --quiet --target "$SITE" --only-binary=:all: --python-version 3.11 \
      --implementation cp --abi cp311 --platform manylinux_2_27_aarch64 \
      --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
      --platform manylinux_2_17_aarch64 --platform any \
      "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" optax chex numpy safetensors tokenizers tqdm \
      orbax-checkpoint
  fi
}
# Building the sysroot and installing the wheels is the environment's part: it runs in its
# own shell (so `set -e` holds there) and a failure exits with status 3, which `.ci/run`
# reports as "not run" rather than as a failure of the code.
if [ "${1:-}" = --setup ]; then setup; exit 0; fi
bash "$0" --setup || { echo "aarch64 smoke: building the arm64 sysroot or its wheels failed" >&2; exit 3; }
echo "== native $(uname -m)"
start=$SECONDS
"$PY" scripts/aarch64_smoke.py > "$ROOT/native.txt"
echo "native: $((SECONDS - start)) s"
echo "== emulated aarch64 (qemu -cpu cortex-a72, a Raspberry Pi 4 core)"
start=$SECONDS
PYTHONPATH="$SITE:$PWD" qemu-aarch64-static -cpu cortex-a72 -L "$SYSROOT" \
  "$SYSROOT/usr/bin/python3.11" scripts/aarch64_smoke.py > "$ROOT/arm.txt"
echo "emulated aarch64: $((SECONDS - start)) s"
"$PY" scripts/aarch64_smoke.py --compare "$ROOT/native.txt" "$ROOT/arm.txt"
