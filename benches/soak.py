"""Soak run: a small bf16 GPT trained for many steps through lanton while gradients are attacked,
checking that nothing leaks, drifts or goes uncounted (issue 10).

    python benches/soak.py                      # 10,000 steps, results in benches/results/soak/
    python benches/soak.py --steps 600 --out /tmp/soak   # the short variant CI runs

Each step draws, with fixed seeds: a gradient spike (all gradients x1e4, finite) with probability
2 %, and a poisoned leaf (one leaf's gradient set to NaN or +-Inf) with probability 3 %. The run
passes when, at the end:
  * every parameter, every state array and the last loss are finite;
  * lanton's per-layer `skipped` counters equal the injected count, leaf by leaf;
  * resident memory (VmRSS) grew by less than --rss-slack MiB between 10 % of the run (after
    compilation and warm-up: step 1,000 of 10,000) and its end.
It writes soak.json and soak.md (figures, machine, versions) to --out and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt  # noqa: E402
import lanton  # noqa: E402

CFG = dict(layers=2, d=32, ctx=16, vocab=64, batch=8)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "soak")
    ap.add_argument("--rss-slack", type=float, default=16.0, help="MiB of RSS growth allowed after warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gpt.init_params(jax.random.key(args.seed), **CFG))
    names, treedef = [lanton.labels.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]], jax.tree.structure(params)
    n_leaves = len(names)
    tx = lanton.lanton(0.02, noise_every=5)
    state = tx.init(params)
    # A learnable synthetic language: a fixed random walk over the vocabulary with noise.
    rng = np.random.default_rng(args.seed)
    table = rng.integers(0, CFG["vocab"], CFG["vocab"])

    def batch():
        x = np.empty((CFG["batch"], CFG["ctx"] + 1), np.int32)
        x[:, 0] = rng.integers(0, CFG["vocab"], CFG["batch"])
        for t in range(1, CFG["ctx"] + 1):
            noise = rng.random(CFG["batch"]) < 0.1
            x[:, t] = np.where(noise, rng.integers(0, CFG["vocab"], CFG["batch"]), table[x[:, t - 1]])
        return x[:, :-1], x[:, 1:]

    @jax.jit
    def step(p, s, x, y, spike, poison):
        loss, g = jax.value_and_grad(lambda p: gpt.loss_fn(p, x, y, heads=4).astype(jnp.float32))(p)
        leaves = [(leaf * spike.astype(leaf.dtype) + poison[i].astype(leaf.dtype)) for i, leaf in enumerate(jax.tree.leaves(g))]
        u, s = tx.update(treedef.unflatten(leaves), s, p)
        return optax.apply_updates(p, u), s, loss

    injected = np.zeros(n_leaves, np.int64)
    spikes = 0
    marks = {}
    warm = max(args.steps // 10, 1)
    first_loss = None
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        x, y = batch()
        spike = np.float32(1e4) if rng.random() < 0.02 else np.float32(1.0)
        spikes += spike != 1.0
        poison = np.zeros(n_leaves, np.float32)
        if rng.random() < 0.03:
            leaf = rng.integers(n_leaves)
            poison[leaf] = rng.choice([np.nan, np.inf, -np.inf])
            injected[leaf] += 1
        params, state, loss = step(params, state, x, y, spike, poison)
        if i == 1:
            first_loss = float(loss)
        if i == warm or i == args.steps or i % max(args.steps // 10, 1) == 0:
            jax.block_until_ready(params)
            marks[i] = rss_mib()
    seconds = time.perf_counter() - t0
    last_loss = float(loss)

    stats = lanton.layer_stats(state)
    skipped = np.array([int(np.sum(stats[n]["skipped"])) for n in names])
    finite = all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in jax.tree.leaves((params, state)))
    growth = marks[args.steps] - marks[warm]
    checks = {
        "finite_params_and_state": finite,
        "finite_last_loss": bool(np.isfinite(last_loss)),
        "skipped_equals_injected": bool(np.array_equal(skipped, injected)),
        "rss_flat": bool(growth < args.rss_slack),
        "loss_decreased": bool(last_loss < first_loss),
    }
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__, "lanton": lanton.library_info()["version"], "steps": args.steps,
        "params_dtype": "bfloat16", "model": CFG, "spikes": int(spikes), "injected_total": int(injected.sum()),
        "skipped_total": int(skipped.sum()), "injected_by_leaf": dict(zip(names, injected.tolist())),
        "skipped_by_leaf": dict(zip(names, skipped.tolist())), "rss_mib": {str(k): round(v, 1) for k, v in marks.items()},
        "rss_growth_mib_after_warmup": round(growth, 2), "warmup_step": warm, "first_loss": first_loss,
        "last_loss": last_loss, "seconds": round(seconds, 1), "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Soak run ({result['date']}, {result['machine']}, jax {result['jax']}, lanton {result['lanton']})", "",
        f"`python benches/soak.py --steps {args.steps}`: bf16 GPT {CFG}, lanton(0.02, noise_every=5).", "",
        "| figure | value |", "|---|---|",
        f"| steps | {args.steps} |", f"| gradient spikes (x1e4) | {spikes} |",
        f"| NaN/Inf leaves injected | {result['injected_total']} |", f"| layer-steps skipped (lanton's counters) | {result['skipped_total']} |",
        f"| RSS at step {warm} | {marks[warm]:.1f} MiB |", f"| RSS at step {args.steps} | {marks[args.steps]:.1f} MiB |",
        f"| RSS growth after warm-up | {growth:.2f} MiB (allowed < {args.rss_slack:g}) |",
        f"| loss first / last | {first_loss:.3f} / {last_loss:.3f} |", f"| wall clock | {seconds:.0f} s |", "",
        "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()), "",
        "RSS by step (MiB): " + ", ".join(f"{k}: {v:.1f}" for k, v in marks.items()),
    ]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
