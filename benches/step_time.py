"""Step-time benchmark: jitted `update + apply_updates` for lanton (fused FFI), lanton's in-place
path, lanton.reference (pure JAX), optax.contrib.muon (hidden-only and default) and optax.adamw,
on the tiny, GPT-2-small and (GPU only) TinyLlama-1.1B parameter sets (../shared/BENCHMARKS.md).
Params and state donated, as in a training loop; warm steps, outputs blocked on; ratios to optax
Muon (hidden-only) from the same run.

lanton rows: `noise off` (r = 1, no noise work), `K=1` (noise work every step), `K=10` (the
default cadence, staggered since 2026-12-08: a tenth of each shape's layers measured on every
step), `K=10 synchronous` (the paper's: every layer measured on every tenth step) and, on GPU,
`K=1, TF32 noise products` (LANTON_NOISE_GEMM=tf32: the opt-in tensor-core kernel for the noise
estimate's products). `K=10`, `K=10 synchronous`, `noise off` and the ratios' base, optax Muon
(hidden only), are timed over whole cadences of 10 consecutive steps (each holds every layer's noise step and G_prev
store once), the rows' steps taken in turn so that the machine's drift falls on all: the
median over cadences of the mean step time, with as many cadences as fit in the set's budget
(`--cadence-budget`, default 3 s; at least one each). K=10 over noise-off and these rows' ratios
to Muon are medians of per-round ratios (paired). The others: a median of repeats, ratio to
Muon's cadence median.

    python benches/step_time.py --sets tiny,gpt2 --repeats 3 --cadence-budget tiny=30,gpt2=900 \
        --out benches/results/step_time_cpu
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lanton  # noqa: E402
from lanton._transform import ADAM_LR_FACTOR  # noqa: E402
from gpt import CONFIG, init_params, model_overrides  # noqa: E402
from optimizers import hidden_only_dims, hybrid  # noqa: E402
from report import emit  # noqa: E402


def gpt2_small():
    d, L = 768, 12
    z = lambda *s: jnp.zeros(s, jnp.float32)
    blk = lambda: {"ln_1": {"scale": z(d), "bias": z(d)}, "ln_2": {"scale": z(d), "bias": z(d)},
                   "q": z(d, d), "k": z(d, d), "v": z(d, d), "o": z(d, d), "q_bias": z(d), "k_bias": z(d), "v_bias": z(d),
                   "o_bias": z(d), "fc": z(d, 4 * d), "fc_bias": z(4 * d), "proj": z(4 * d, d), "proj_bias": z(d)}
    return {"wte": z(50257, d), "wpe": z(1024, d), "blocks": [blk() for _ in range(L)], "ln_f": {"scale": z(d), "bias": z(d)}}


def tinyllama():
    d, L, z = 2048, 22, (lambda *s: jnp.zeros(s, jnp.float32))
    blk = lambda: {"q": z(d, d), "o": z(d, d), "k": z(d, 256), "v": z(d, 256), "gate": z(d, 5632), "up": z(d, 5632),
                   "down": z(5632, d), "norm_1": {"scale": z(d)}, "norm_2": {"scale": z(d)}}
    return {"embed": z(32000, d), "lm_head": z(d, 32000), "blocks": [blk() for _ in range(L)], "norm_f": {"scale": z(d)}}


def param_set(name):
    if name == "tiny":
        return init_params(jax.random.key(0), **{**CONFIG, **model_overrides()})
    p = gpt2_small() if name == "gpt2" else tinyllama()
    leaves, tdef = jax.tree.flatten(p)
    ks = jax.random.split(jax.random.key(0), len(leaves))
    return tdef.unflatten([0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(ks, leaves)])


# Derived floors for one H100 (../shared/BENCHMARKS.md): the whole lanton step, bf16 products.
LOWER_BOUND_S = {"gpt2": 2.1e-3, "tinyllama": 49e-3}


def _not_hidden(params):
    return jax.tree.map(lambda k: None if k == "hidden" else k, lanton.default_labels(params))


def _hidden_only(params):
    return jax.tree.map(lambda k: k if k == "hidden" else None, lanton.default_labels(params))


def _is_not_hidden(params):
    return jax.tree.map(lambda k: k != "hidden", lanton.default_labels(params))


def contenders():
    muon = lambda **kw: optax.contrib.muon(0.02, adam_learning_rate=3e-3, **kw)
    return {
        "lanton noise off": ("tx", lambda: lanton.lanton(0.02, noise_adaptive=False)),
        "lanton K=1": ("tx", lambda: lanton.lanton(0.02, noise_every=1)),
        "lanton K=10": ("tx", lambda: lanton.lanton(0.02, noise_every=10)),
        "lanton K=10 synchronous": ("tx", lambda: lanton.lanton(0.02, noise_every=10, noise_schedule="synchronous")),
        # Issue 41: the default's Adam part in lanton's kernels vs the same recipe as optax.multi_transform
        # (lanton on the hidden matrices, optax.adamw beside it), and vs the LMO steps for those leaves.
        "hybrid K=10 (multi_transform)": ("tx", lambda: hybrid(0.02, ADAM_LR_FACTOR * 0.02, noise_every=10)),
        "lanton K=10, other=lmo": ("tx", lambda: lanton.lanton(0.02, noise_every=10, other="lmo")),
        # Where the default's extra time over the hybrid goes (noise off: the same work every step):
        # the hidden matrices alone, and the hybrid, against "lanton noise off".
        "lanton noise off, hidden only": ("tx", lambda: lanton.lanton(0.02, noise_adaptive=False, labels=_hidden_only)),
        "hybrid noise off (multi_transform)": ("tx", lambda: hybrid(0.02, ADAM_LR_FACTOR * 0.02, noise_adaptive=False)),
        # The Adam part alone (hidden matrices pass through in both): lanton's fused call vs optax.adamw.
        "Adam part only: lanton": ("tx", lambda: lanton.lanton(0.02, labels=_not_hidden)),
        "Adam part only: optax.adamw": ("tx", lambda: optax.masked(
            optax.adamw(0.008, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=True), _is_not_hidden)),
        "lanton K=1, TF32 noise products": ("tx", lambda: lanton.lanton(0.02, noise_every=1)),
        "lanton in-place noise off": ("fused", lambda: lanton.fused(0.02, noise_adaptive=False)),
        "lanton in-place K=10": ("fused", lambda: lanton.fused(0.02, noise_every=10)),
        "lanton in-place K=10 synchronous": ("fused", lambda: lanton.fused(0.02, noise_every=10, noise_schedule="synchronous")),
        "lanton noise off, f32 NS": ("tx", lambda: lanton.lanton(0.02, noise_adaptive=False, ns_dtype="float32")),
        "lanton.reference noise off": ("tx", lambda: lanton.lanton(0.02, noise_adaptive=False, backend="reference")),
        "lanton.reference K=1": ("tx", lambda: lanton.lanton(0.02, noise_every=1, backend="reference")),
        "optax muon (hidden only)": ("tx", lambda: muon(muon_weight_dimension_numbers=hidden_only_dims)),
        "optax muon (default)": ("tx", lambda: muon()),
        "optax adamw": ("tx", lambda: optax.adamw(3e-3, b2=0.95, weight_decay=0.1)),
    }


# Rows timed over whole cadences of this many consecutive steps (K = 10), step by step in turn so
# that a drift of the machine's speed falls on all alike: K = 10 against noise-off (the first) and
# against the ratios' base, optax Muon, whose steps all cost the same.
BASE = "optax muon (hidden only)"
CADENCE_ROWS = ("lanton noise off", "lanton K=10", "lanton K=10 synchronous", "hybrid K=10 (multi_transform)",
                "lanton K=10, other=lmo", BASE)
CADENCE = 10
CADENCE_BUDGET_S = 3.0


def donated_step(tx):
    """The timed training-loop step: jitted update + apply_updates, params and state donated
    (in place, as in real training)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def stepper(kind, make, params, grad_sets):
    """A warm `timed(n)` -> the n step times; gradients alternate between two sets so that
    G - G_prev != 0 (a repeated gradient would make the noise estimate trivially zero)."""
    n = [0]

    def next_grads():
        n[0] += 1
        return grad_sets[n[0] % 2]

    if kind == "fused":
        fz = make()
        p = jax.tree.map(jnp.copy, params)
        s = fz.init(p)
        step = lambda p, s: fz.step(next_grads(), s, p)
    else:
        tx = make()
        p = jax.tree.map(jnp.copy, params)  # donated below
        s = tx.init(p)
        _step = donated_step(tx)
        step = lambda p, s: _step(p, s, next_grads())
    for _ in range(2):  # compile, then one warm step (t = 2: the first noise step for K = 1)
        p, s = jax.block_until_ready(step(p, s))

    def timed(n):
        nonlocal p, s
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            p, s = jax.block_until_ready(step(p, s))
            times.append(time.perf_counter() - t0)
        return times

    return timed


# Rows timed with environment variables set (the library reads them at each call on the host,
# so these rows run alone, never in turn with others): the opt-in tensor-core noise products.
ROW_ENV = {"lanton K=1, TF32 noise products": {"LANTON_NOISE_GEMM": "tf32"}}


def time_one(kind, make, params, grad_sets, repeats, env=None):
    """Median of `repeats` warm steps (with `env` set for the row's steps, restored after)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return statistics.median(stepper(kind, make, params, grad_sets)(repeats))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def time_cadences(rows, params, grad_sets, budget_s=CADENCE_BUDGET_S):
    """({name: [mean step time of each round's cadence]}, {name: [slowest step / median step of
    each cadence]}), the rows' steps taken in turn (at least one cadence each, `budget_s` in all):
    ratios within a round are paired (drift cancels); the second is the cadence's spike."""
    timers = {name: stepper(kind, make, params, grad_sets) for name, (kind, make) in rows.items()}
    cadences = {name: [] for name in rows}
    spikes = {name: [] for name in rows}
    while not cadences[next(iter(rows))] or sum(map(sum, cadences.values())) * CADENCE < budget_s:
        # Step by step in turn (each row's own state: its cadence runs on), so that a drift of
        # the machine's speed within a cadence falls on every row alike.
        steps = {name: [] for name in rows}
        for _ in range(CADENCE):
            for name, timed in timers.items():
                steps[name] += timed(1)
        for name in rows:
            cadences[name].append(statistics.mean(steps[name]))
            spikes[name].append(max(steps[name]) / statistics.median(steps[name]))
    return cadences, spikes


def paired_ratios(cadences, over):
    """Each row's per-round cadence over row `over`'s in the same round."""
    return {name: [c / o for c, o in zip(cs, cadences[over])] for name, cs in cadences.items()}


def render(meta, results, backend, repeats):
    """The markdown table of every set timed so far."""
    lines = [f"# Step time ({meta['date']}, {backend}: {meta['device']}, {meta['machine']}, jax {meta['jax']})", "",
             f"Jitted update + apply_updates (params and state donated), warm: median of {repeats} steps, or for "
             f"{', '.join(CADENCE_ROWS)} the median over cadences of {CADENCE} consecutive steps "
             f"of their mean step time, the rows' steps taken in turn (to fill the set's budget, at least one cadence each). "
             f"Ratio: time / {BASE}, same run; (paired): the median over rounds of the ratio within a round.", ""]
    for set_name, r in results.items():
        floor = LOWER_BOUND_S.get(set_name) if backend == "gpu" else None
        lines += [f"## {set_name} ({r['params'] / 1e6:.2f} M params)", ""]
        if floor:
            lines += [f"Lower bound (one H100, BENCHMARKS.md): {1000 * floor:.1f} ms.", ""]
        lines += ["| optimizer | ms / step | ratio | x lower bound |", "|---|---:|---:|---:|"]
        ref = r["seconds"].get(BASE)
        for name, sec in r["seconds"].items():
            q = r["paired_over_base"].get(name, sec / ref if ref else None)
            ratio = "-" if q is None else f"{q:.2f}" + (" (paired)" if name in r["paired_over_base"] and name != BASE else "")
            lines.append(f"| {name} | {1000 * sec:.1f} | {ratio} | {f'{sec / floor:.2f}' if floor else '-'} |")
        lines.append("")
        if r.get("spike_over_median"):
            cells = ", ".join(f"{n} {x:.2f}" for n, x in r["spike_over_median"].items())
            lines += [f"Spikes: the slowest step of a cadence of {CADENCE} over its median step (median over cadences): {cells}.", ""]
        first = next(iter(r["paired_over_first_cadence_row"]), None)
        for name, q in [(n, q) for n, q in r["paired_over_first_cadence_row"].items() if n not in (first, BASE)]:
            rounds = ", ".join(f"{100 * (x - 1):+.1f}" for x in r["per_round_over_first_cadence_row"][name])
            lines += [f"{name} over {first}, paired cadences over {r['cadence_budget_s']:g} s (median of per-round ratios): "
                      f"{100 * (q - 1):+.1f} % "
                      f"(rounds: {rounds} %)", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="tiny,gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="contender names separated by ';'")
    ap.add_argument("--cadence-budget", default=str(CADENCE_BUDGET_S),
                    help="seconds for the paired cadence rows per set (at least one cadence each): "
                         "one number, or per set as tiny=30,gpt2=600")
    ap.add_argument("--out", default=None, help="path prefix for .json and .md results")
    args = ap.parse_args()
    budgets = {}
    for part in args.cadence_budget.split(","):
        name, _, sec = part.rpartition("=")
        budgets[name or "*"] = float(sec)
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    meta = {"date": datetime.date.today().isoformat(), "backend": backend, "device": device,
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "jax": jax.__version__,
            "lanton": lanton.__version__, "kernels": lanton.kernels_available(), "repeats": args.repeats}
    print(json.dumps(meta))
    results = {}
    for set_name in args.sets.split(","):
        if set_name == "tinyllama" and backend == "cpu":
            print("skipping tinyllama: GPU only")
            continue
        params = param_set(set_name)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        leaves, tdef = jax.tree.flatten(params)
        grad_sets = [tdef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(jax.random.key(seed), len(leaves)), leaves)])
                     for seed in (1, 2)]
        rows, cadence_rows = {}, {}
        for name, (kind, make) in contenders().items():
            if args.only and name not in args.only.split(";"):
                continue
            if ("f32 NS" in name or name in ROW_ENV) and backend == "cpu":
                continue  # the CPU kernels always use f32, and have no tensor-core products
            if name in CADENCE_ROWS:
                cadence_rows[name] = (kind, make)
                continue
            rows[name] = time_one(kind, make, params, grad_sets, args.repeats, ROW_ENV.get(name))
            print(f"  {set_name:>8} {name:<30} {1000 * rows[name]:10.1f} ms", flush=True)
        cadences, spikes, per_round, per_round_base = {}, {}, {}, {}
        budget = budgets.get(set_name, budgets.get("*", CADENCE_BUDGET_S)) if cadence_rows else None
        if cadence_rows:
            cadences, spikes = time_cadences(cadence_rows, params, grad_sets, budget)
            medians = {name: statistics.median(cs) for name, cs in cadences.items()}
            for name, sec in medians.items():
                print(f"  {set_name:>8} {name:<30} {1000 * sec:10.1f} ms (cadences)", flush=True)
            rows = {**medians, **rows}
            per_round = paired_ratios(cadences, next(iter(cadences)))
            per_round_base = paired_ratios(cadences, BASE) if BASE in cadences else {}
        results[set_name] = {"params": int(n_params), "seconds": rows, "cadence_budget_s": budget,
                             "cadences_s": cadences,
                             "spike_over_median": {n: statistics.median(x) for n, x in spikes.items()},
                             "paired_over_first_cadence_row": {n: statistics.median(r) for n, r in per_round.items()},
                             "per_round_over_first_cadence_row": per_round,
                             "paired_over_base": {n: statistics.median(r) for n, r in per_round_base.items()}}
        # Saved after each set: a run cut short (a device lease's limit) keeps the sets it finished.
        emit(render(meta, results, backend, args.repeats), {"meta": meta, "results": results}, args.out)


if __name__ == "__main__":
    main()
