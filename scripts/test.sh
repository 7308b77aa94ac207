#!/usr/bin/env bash
# All tests: Rust (cargo test), quick Python passes on the oldest and the newest versions lanton
# supports (scripts/test_versions.sh), then the full Python suite on the pinned versions (pytest on
# both cores, which prints the closing summary line CI reads).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
took() { echo "[scripts/test.sh] $1: $((SECONDS - start)) s since the start"; }
bash scripts/setup.sh
took "set-up"
export LANTON_PYTHON="$PWD/.venv/bin/python"   # lets the Rust layout test find jaxlib's c_api.h
# One persistent XLA compilation cache for every Python process of the run (pytest's workers and
# the scripts the tests start): a program compiled in one (the benchmark GPT's step, a test's
# update) is loaded, not compiled again, in the others, and a second run compiles little. Its
# keys hold the jax version and the program, so the three version sets share it safely.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"
# (No size limit: jax needs the `filelock` package for one. `rm -rf .cache` empties it.)
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}"
# The other versions' venvs install (downloads, unpacking) while cargo compiles and runs the Rust tests.
logs=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
bash scripts/test_versions.sh oldest prepare >"$logs/oldest" 2>&1 &
oldest=$!
bash scripts/test_versions.sh newest prepare >"$logs/newest" 2>&1 &
newest=$!
cargo test --release
took "cargo test"
wait "$oldest" || { cat "$logs/oldest"; exit 1; }
wait "$newest" || { cat "$logs/newest"; exit 1; }
bash scripts/test_versions.sh oldest run
took "oldest versions"
bash scripts/test_versions.sh newest run
took "newest versions"
# Last: CI reads the last summary line, which must be the main run's.
.venv/bin/python -m pytest -q -n "${LANTON_TEST_WORKERS:-2}" --dist load --maxschedchunk 2 --durations=25 tests/python
