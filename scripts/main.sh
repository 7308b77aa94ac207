#!/usr/bin/env bash
# The main job: build and install everything, then a short demo against optax Muon
# (Shakespeare byte-level GPT, 400 steps each) and the Newton-Schulz kernel benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo bench --bench newton_schulz -- --quick
PYTHONUNBUFFERED=1 .venv/bin/python benches/demo.py --steps "${DEMO_STEPS:-400}"
