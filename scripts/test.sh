#!/usr/bin/env bash
# All tests: Rust (cargo test) then Python (pytest, which prints the closing summary line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LANTON_PYTHON="$PWD/.venv/bin/python"   # lets the Rust layout test find jaxlib's c_api.h
cargo test --release
.venv/bin/python -m pytest -q tests/python
