"""The main job's short comparison: train the Shakespeare GPT for a few hundred steps with
lanton (fused kernels) and with optax.contrib.muon (hidden-only, Adam lr 3e-3), print both
losses and the time per step (both trained in lockstep, one step of each in turn). Full benchmark: benches/convergence.py (issue 5)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import lanton  # noqa: E402
from gpt import load_corpus, train_lockstep  # noqa: E402
from optimizers import DEFAULT_LR, make  # noqa: E402

# Rates picked by training loss at the demo's short horizon: lanton (its default rule) 0.015 of
# 0.0075 / 0.015 / 0.03 at 400 steps (2026-12-06), optax Muon 0.02 from its 500-step sweep. At the
# benchmark's 1500 steps both want lower ones (lanton's default 0.0075, Muon 0.00707):
# benches/quality.py is the fair comparison.
DEMO_LR = {**DEFAULT_LR, "lanton": 0.015}

try:
    from tqdm import tqdm
except ImportError:  # the bar is a nicety
    tqdm = None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--optimizers", default="lanton,muon")
    ap.add_argument("--out", default=None, help="write the histories as JSON here")
    args = ap.parse_args()
    print(f"lanton {lanton.__version__}, kernels: {lanton.library_info() if lanton.kernels_available() else 'unavailable (pure JAX)'}")
    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or platform.machine()}")
    corpus = load_corpus()
    names = args.optimizers.split(",")
    bar = tqdm(total=args.steps, desc="training", ncols=100, mininterval=5) if tqdm else None
    last = {}

    def progress(name, i, loss):
        last[name] = loss
        if bar and name == names[-1]:
            bar.update(1)
            bar.set_postfix({n: f"{v:.3f}" for n, v in last.items()})

    # One step of each optimizer in turn: the time ratio is measured under the same conditions.
    results = train_lockstep({n: make(n, DEMO_LR[n]) for n in names}, args.steps, corpus=corpus,
                             eval_every=max(args.steps // 4, 1), progress=progress)
    if bar:
        bar.close()
    print(f"\n{'optimizer':<18}{'lr':>8}{'train loss':>11}{'val loss':>10}{'ms/step':>9}")
    for name, h in results.items():
        tail = sum(h["train_loss"][-20:]) / len(h["train_loss"][-20:])
        print(f"{name:<18}{DEMO_LR[name]:>8g}{tail:>11.4f}{h['val_loss'][-1]:>10.4f}{1000 * h['seconds_per_step']:>9.1f}")
    if "lanton" in results and "muon" in results:
        r = results["lanton"]["seconds_per_step"] / results["muon"]["seconds_per_step"]
        print(f"lanton / muon time per training step (forward+backward+update), same run: {r:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
