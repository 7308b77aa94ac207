#!/usr/bin/env bash
# The CUDA path in one call, on a machine with a GPU and jax's CUDA plugin (no package index
# needed): build, GPU test suite, compute-sanitizer on a short case, step-time benchmark against
# optax.contrib.muon (GPT-2 small, TinyLlama-1.1B). The table comes last.
#
#   bash tests/gpu/run.sh                # builds with cargo if present
#   LANTON_LIBRARY=/path/liblanton.so bash tests/gpu/run.sh   # a prebuilt library (no cargo there)
#
# Results land in ${OUT:-benches/results}/step_time_gpu.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
RESULTS=${OUT:-benches/results}
mkdir -p "$RESULTS"

if [ -z "${LANTON_LIBRARY:-}" ]; then
  command -v cargo >/dev/null || { echo "no cargo here: build liblanton.so elsewhere and set LANTON_LIBRARY" >&2; exit 1; }
  cargo build --release --lib
  export LANTON_LIBRARY="$PWD/target/release/liblanton.so"
fi
export PYTHONPATH="$PWD/jax_bindings:$PWD/benches:$PWD/tests/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax, lanton; print(jax.devices(), lanton.library_info()); assert jax.default_backend() == 'gpu'"

echo "== NVRTC kernels for this device and the GPU test suite"
"$PY" -m pytest -q tests/gpu/test_cuda.py

echo "== compute-sanitizer (memcheck) on a short case"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/gpu/sanitize_case.py
else
  echo "compute-sanitizer not found: SKIPPED"
fi

echo "== step time against optax.contrib.muon"
"$PY" benches/step_time.py --sets tiny,gpt2,tinyllama --repeats 5 --out "$RESULTS/step_time_gpu"
