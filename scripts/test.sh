#!/usr/bin/env bash
# All tests: Rust (cargo test), a quick Python pass on the oldest supported jax (scripts/test_oldest.sh),
# then the full Python suite (pytest, which prints the closing summary line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LANTON_PYTHON="$PWD/.venv/bin/python"   # lets the Rust layout test find jaxlib's c_api.h
cargo test --release
# The oldest declared jax/jaxlib/optax (a quick subset) first: CI reads the last summary line,
# which must be the main run's.
bash scripts/test_oldest.sh
.venv/bin/python -m pytest -q tests/python
