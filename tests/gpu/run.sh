#!/usr/bin/env bash
# The CUDA path in one call, on a machine with a GPU and jax's CUDA plugin (no package index
# needed): build, GPU test suite, CUDA graphs on vs off (bitwise), the no-host-sync check,
# compute-sanitizer (memcheck, racecheck, synccheck) on a short case, step-time benchmark against
# optax.contrib.muon (GPT-2 small, TinyLlama-1.1B). The table comes last; failures are listed at
# the end (exit 1). Each step runs under a time limit and a failing step does not stop the
# ones after it (a GPU lease is short: one call should report everything). The step-time table
# is saved after each parameter set.
#
#   bash tests/gpu/run.sh                # builds with cargo if present
#   LANTON_LIBRARY=/path/liblanton.so bash tests/gpu/run.sh   # a prebuilt library (no cargo there)
#
# Results land in ${OUT:-benches/results}/step_time_gpu.{json,md}. Knobs: STEP_TIME_SETS
# (default tiny,gpt2,tinyllama), STEP_TIME_ARGS (default --repeats 5), STEP_TIME_ONLY (contender
# names separated by ';', default all), LIMIT_S (seconds per
# step, default 300), SANITIZER_LIMIT_S (per tool, default 120). The whole default run does not
# fit a 15-minute device lease; the first run (2026-12-04, H200, benches/results/gpu_2026-12-04.md)
# took 362 s with LIMIT_S=150 SANITIZER_LIMIT_S=60 STEP_TIME_SETS=gpt2,tinyllama
# STEP_TIME_ARGS="--repeats 5 --cadence-budget 8" and six STEP_TIME_ONLY rows (TinyLlama cut short).
# For the next one: LIMIT_S=240, STEP_TIME_ARGS="--repeats 3 --cadence-budget 4" and STEP_TIME_ONLY
# "lanton noise off;lanton K=10;optax muon (hidden only);lanton K=1;lanton K=1, TF32 noise
# products;lanton in-place noise off;optax muon (default)" (the opt-in TF32 row is the question).
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

LIMIT=${LIMIT_S:-300}
FAILED=()
echo "== NVRTC kernels for this device and the GPU test suite"
timeout "$LIMIT" "$PY" -m pytest -q tests/gpu/test_cuda.py || FAILED+=("test_cuda")

echo "== no host sync: no conditional or host transfer in a steady-state step"
timeout "$LIMIT" "$PY" tests/gpu/graph_check.py no-sync || FAILED+=("no-sync")

echo "== CUDA graphs: command buffers forced on for every custom call vs off, bitwise (f32/bf16/f16, 50 donated fused steps)"
TMP=$(mktemp -d)
if XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=+CUSTOM_CALL" \
     timeout "$LIMIT" "$PY" tests/gpu/graph_check.py dump "$TMP/graphs_on.npz" \
   && XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
     timeout "$LIMIT" "$PY" tests/gpu/graph_check.py dump "$TMP/graphs_off.npz" \
   && "$PY" tests/gpu/graph_check.py compare "$TMP/graphs_on.npz" "$TMP/graphs_off.npz"; then :; else FAILED+=("graphs"); fi

echo "== step time against optax.contrib.muon"
timeout "$LIMIT" "$PY" benches/step_time.py --sets "${STEP_TIME_SETS:-tiny,gpt2,tinyllama}" ${STEP_TIME_ARGS:---repeats 5} \
  ${STEP_TIME_ONLY:+--only "$STEP_TIME_ONLY"} --out "$RESULTS/step_time_gpu" || FAILED+=("step time")

# memcheck over every kernel (cuBLAS's too: a wrong leading dimension shows there); racecheck and
# synccheck over ours (lanton_*), which are the ones with shared memory and barriers.
echo "== compute-sanitizer (memcheck, racecheck, synccheck) on a short case"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    only=(); [ "$tool" = memcheck ] || only=(--kernel-name kns=lanton_)
    timeout "${SANITIZER_LIMIT_S:-120}" compute-sanitizer --tool "$tool" "${only[@]}" --error-exitcode 1 \
      "$PY" tests/gpu/sanitize_case.py || FAILED+=("sanitizer $tool")
  done
else
  echo "compute-sanitizer not found: SKIPPED"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "all GPU checks passed"
