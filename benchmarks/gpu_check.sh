#!/usr/bin/env bash
# The GPU check on the GPU machine (its own python3 and torch, no TVM, no network), with .carry/ from
# `python benchmarks/gpu_check.py package` carried along:
#   bash benchmarks/gpu_check.sh OUT [--budget SECONDS] [--rounds N] [--dry-run]
# TVM's runtime and the tvm-ffi wheel go into a temporary folder; fxopt runs from this checkout. FXOPT_CARRY
# names another carried folder than the checkout's .carry.
set -euo pipefail
out=$(realpath -m "${1:?usage: bash benchmarks/gpu_check.sh OUT [run options]}")
shift
root=$(cd "$(dirname "$0")/.." && pwd)
carry=$(realpath -m "${FXOPT_CARRY:-$root/.carry}")
site=$(mktemp -d /tmp/fxopt-carry.XXXXXX)
trap 'rm -rf "$site"' EXIT
tar -xJf "$carry/tvm-runtime.tar.xz" -C "$site"
if compgen -G "$carry/wheels/*.whl" >/dev/null; then  # tvm-ffi for another Python than the packaging one's
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/wheels/*.whl
fi
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
python3 "$root/benchmarks/gpu_check.py" run --carry "$carry" "$out" "$@"
