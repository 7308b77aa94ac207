#!/usr/bin/env bash
# The GPU check in one call that fits a short device lease: parts in order of value, each under
# min(its own limit, what is left of BUDGET_S), each part's results saved the moment it ends, so
# a run cut short keeps everything it finished. A failing part does not stop the ones after it.
#
#   1 device       jax sees a GPU; the library loads (its path and ABI)
#   2 suite        the GPU test suite (tests/gpu/test_cuda.py: against the reference and the CPU
#                  kernels for every kind and dtype, in place, non-finite, many leaves, TF32)
#   3 no-sync      no conditional or host transfer in a steady-state step
#   4 graphs       CUDA command buffers forced on vs off: parameters bitwise equal (f32/bf16/f16)
#   5 step-time    GPT-2 small and TinyLlama-1.1B: noise off, K=10 (the default, staggered), K=10 synchronous, K=1, in place,
#                  optax Muon hidden-only and default (benches/step_time.py, with cadence spikes)
#   6 profile      where one GPT-2-small step's time goes: wall vs device time, top kernels
#                  (benches/step_profile.py)
#   7 sanitizers   compute-sanitizer on a short case: memcheck (every kernel), then racecheck one of
#                  our kernels at a time (their names from src/cuda/kernels.cu) and synccheck
#   8 gpt2-point   benches/gpt2_point.sh, only if GPT2_POINT=1 and time is left
#
#   bash tests/gpu/run.sh                                   # target/release/liblanton.so or cargo
#   LANTON_LIBRARY=/path/liblanton.so bash tests/gpu/run.sh # a library built elsewhere
#
# The GPU machine has no cargo and no package index: build the library on the development machine
# (cargo build --release --lib) and carry target/release/liblanton.so. Results: ${OUT:-
# benches/results/gpu_<date>}/ (summary.md, one log per part, step_time_gpu.*, step_profile_gpu.*).
# Knobs: BUDGET_S (default 450: 7.5 min, inside an 8-minute window), SETS (default gpt2,tinyllama),
# LIMIT_SCALE (multiplies every part's own limit). Exit 1 if any part failed or did not run.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
RESULTS=${OUT:-benches/results/gpu_$(date +%F)}
BUDGET=${BUDGET_S:-450}
SCALE=${LIMIT_SCALE:-1}
START=$SECONDS
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.md"

if [ -z "${LANTON_LIBRARY:-}" ]; then
  if [ -f target/release/liblanton.so ] && ! command -v cargo >/dev/null; then
    export LANTON_LIBRARY="$PWD/target/release/liblanton.so"
  elif command -v cargo >/dev/null; then
    cargo build --release --lib && export LANTON_LIBRARY="$PWD/target/release/liblanton.so"
  else
    echo "no cargo and no target/release/liblanton.so: build the library elsewhere and set LANTON_LIBRARY" >&2
    exit 1
  fi
fi
export PYTHONPATH="$PWD/jax_bindings:$PWD/benches:$PWD/tests/python${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# GPU check ($(date -u +%FT%TZ))"
  echo
  echo "Budget ${BUDGET} s; device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo unknown)."
  echo
  echo "| part | status | seconds | log |"
  echo "|---|---|---:|---|"
} >"$SUMMARY"

FAILED=()
# part NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S * SCALE, what is left), logs it to
# $RESULTS/NAME.log and appends its line to the summary at once.
part() {
  local name=$1 limit=$2
  shift 2
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    echo "| $name | not run (budget spent) | 0 | |" >>"$SUMMARY"
    FAILED+=("$name (not run)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, ${left} s left)"
  local t0=$SECONDS status rc
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 25 "$RESULTS/$name.log"
  case $rc in
    0) status=passed ;;
    124) status="timed out after ${limit} s"; FAILED+=("$name") ;;
    *) status="FAILED (exit $rc)"; FAILED+=("$name") ;;
  esac
  echo "| $name | $status | $((SECONDS - t0)) | [$name.log]($name.log) |" >>"$SUMMARY"
}

part device 60 "$PY" -c "import jax, lanton; print(jax.devices(), lanton.library_info()); assert jax.default_backend() == 'gpu', 'no GPU backend'"
part suite 150 env LANTON_REQUIRE_GPU=1 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py --junitxml="$RESULTS/suite.xml"
part no-sync 60 "$PY" tests/gpu/graph_check.py no-sync
TMP=$(mktemp -d)
part graphs 150 bash -c "
  XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_FLAGS='${XLA_FLAGS:-} --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=+CUSTOM_CALL' \
    '$PY' tests/gpu/graph_check.py dump '$TMP/graphs_on.npz' &&
  XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_FLAGS='${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=' \
    '$PY' tests/gpu/graph_check.py dump '$TMP/graphs_off.npz' &&
  '$PY' tests/gpu/graph_check.py compare '$TMP/graphs_on.npz' '$TMP/graphs_off.npz'"
part step-time 200 "$PY" benches/step_time.py --sets "${SETS:-gpt2,tinyllama}" --repeats 3 --cadence-budget gpt2=20,tinyllama=40 \
  --only "lanton noise off;lanton K=10;lanton K=10 synchronous;lanton K=1;lanton in-place K=10;lanton in-place K=10 synchronous;optax muon (hidden only);optax muon (default)" \
  --out "$RESULTS/step_time_gpu"
part profile 90 "$PY" benches/step_profile.py --set gpt2 --rows "lanton K=10;lanton K=10 synchronous;lanton noise off;optax muon (hidden only)" \
  --steps 10 --out "$RESULTS/step_profile_gpu"
if command -v compute-sanitizer >/dev/null; then
  # memcheck first, over every kernel (cuBLAS's too: a wrong leading dimension shows there). Some
  # machines' sanitizer refuses the device ("Device not supported", seen on the gVisor H200s):
  # then the per-kernel runs below would each fail the same way, so they are not started.
  part memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/gpu/sanitize_case.py
  if grep -q "Device not supported" "$RESULTS/memcheck.log" 2>/dev/null; then
    echo "| racecheck, synccheck | not run: compute-sanitizer does not support this device | 0 | |" >>"$SUMMARY"
  else
    # One kernel at a time: the 2026-12-04 run's racecheck over all of them stopped with an
    # internal sanitizer error; this names the kernel that trips it.
    for k in $(sed -n 's/^extern "C" __global__ void \([a-z_0-9]*\)(.*/\1/p' src/cuda/kernels.cu); do
      part "racecheck-$k" 40 compute-sanitizer --tool racecheck --kernel-name "kns=$k" --error-exitcode 1 "$PY" tests/gpu/sanitize_case.py
    done
    part synccheck 60 compute-sanitizer --tool synccheck --kernel-name kns=lanton_ --error-exitcode 1 "$PY" tests/gpu/sanitize_case.py
  fi
else
  echo "| compute-sanitizer | not found on this machine | 0 | |" >>"$SUMMARY"
fi
if [ "${GPT2_POINT:-0}" = 1 ]; then
  part gpt2-point 600 bash benches/gpt2_point.sh
fi

echo >>"$SUMMARY"
echo "Total: $((SECONDS - START)) s." >>"$SUMMARY"
cat "$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "all GPU checks passed"
