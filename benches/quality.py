"""Training quality: the ablation protocol of issue 14 on the Shakespeare GPT (../shared/BENCHMARKS.md).

For every variant (optax Muon, lanton and its parts, see VARIANTS):
1. a learning-rate sweep at --sweep-steps (default: the full horizon), seed 0, on the same grid shape
   for everyone (half, once and twice the variant's default rate), walked outward from the default:
   down while each halving improves, else up while each doubling does, at most twice past the
   grid's edge. The training loss is taken as unimodal in the rate, so a point beyond one that is
   already worse than its neighbour nearer the default is not run (points already in the journal
   count too). "Best" is the lowest training loss over the sweep run's last 100 steps: the
   validation split is never used to tune, only to report. --refine V adds, for variant V, the two
   factor-sqrt(2) neighbours of the walk's best rate (a finer grid, for the rows a claim rests on;
   give it to the baseline too);
2. the best rate trained for --steps with --seeds seeds (seed 0 reuses the sweep run when the
   horizons are equal);
3. a report (report.md), the runs (runs.jsonl) and plots under --out: final loss per seed, mean,
   spread, steps to tuned Muon's mean final loss per seed and on the seed-mean curve.

Every finished run is appended to runs.jsonl, so the protocol can be done in pieces on the 2-core
machine: run the same command again and finished runs are reused; --budget-minutes stops before a
run that would start after the budget, and the report says what is still missing.

Full protocol (about 1.5 h per variant here; resumable):  python benches/quality.py
A piece of it:                                            python benches/quality.py --budget-minutes 60
Some variants only:                                       python benches/quality.py --variants muon,hybrid
Smoke run (a minute):   python benches/quality.py --steps 30 --sweep-steps 20 --seeds 1 --variants muon,lanton_p05 --out /tmp/q
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lanton  # noqa: E402
from convergence import steps_to  # noqa: E402
from gpt import corpus_name, load_corpus, model_overrides, train  # noqa: E402
from optimizers import make  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

LANTON_GRID = [0.015, 0.03, 0.06]
# Every variant names its ratio power, reference statistic and noise schedule, so a journal entry
# keeps its meaning when lanton's defaults change (they did: ratio_power 1 -> 0.5, ratio_stat
# max -> median, noise_schedule synchronous -> staggered; every run before 2026-12-07 was synchronous).
# Since 2026-12-07 lanton's default steps the non-hidden leaves by NAdamW (other="adam"); every
# variant before it used the LMO geometry there, and says so (other="lmo").
P1 = {"ratio_power": 1.0, "ratio_stat": "max", "noise_schedule": "synchronous", "other": "lmo"}
P05 = {"ratio_power": 0.5, "ratio_stat": "max", "noise_schedule": "synchronous", "other": "lmo"}
# name -> (contender of optimizers.make, lanton options, learning-rate grid, Option II?, what it isolates)
VARIANTS = {
    "muon": ("muon", {}, [0.01, 0.02, 0.04], False, "optax.contrib.muon, hidden only, tuned Adam part (the baseline)"),
    "lanton": ("lanton", P1, LANTON_GRID, False, "lanton, the paper's ratio r = alpha/max alpha (K = 10)"),
    "lanton_noise_off": ("lanton_noise_off", {"other": "lmo"}, LANTON_GRID, False, "1. lanton with r = 1 (D-Muon / Scion-like)"),
    "hybrid": ("hybrid", P1, LANTON_GRID, False, "2. lanton on hidden matrices + Muon's Adam part on the rest"),
    "hybrid_noise_off": ("hybrid", {"noise_adaptive": False}, LANTON_GRID, False, "2. the same with r = 1"),
    "lanton_p05": ("lanton", P05, LANTON_GRID, False, "3. tempered ratio r = (alpha/ref)^0.5"),
    "lanton_p025": ("lanton", {**P05, "ratio_power": 0.25}, LANTON_GRID, False, "3. tempered ratio r = (alpha/ref)^0.25"),
    "lanton_p075": ("lanton", {**P05, "ratio_power": 0.75}, LANTON_GRID, False, "3. tempered ratio r = (alpha/ref)^0.75"),
    "hybrid_p05": ("hybrid", P05, LANTON_GRID, False, "2 + 3. the hybrid with the tempered ratio (p = 0.5)"),
    "lanton_floor": ("lanton", {**P1, "ratio_floor": 0.1}, LANTON_GRID, False, "3. ratio floor r >= 0.1"),
    "lanton_split": ("lanton", {**P1, "labels": "split"}, LANTON_GRID, False, "3. QK / VO / MLP groups instead of one hidden group"),
    "lanton_split_p05": ("lanton", {**P05, "labels": "split"}, LANTON_GRID, False,
                         "3. QK / VO / MLP groups with the tempered ratio (p = 0.5)"),
    "lanton_rel": ("lanton", {**P1, "noise_relative": True}, LANTON_GRID, False, "3. noise-to-signal: H on (||G - G_prev|| / ||B||)^2"),
    "lanton_rel_p05": ("lanton", {**P05, "noise_relative": True}, LANTON_GRID, False, "3. noise-to-signal with the tempered ratio (p = 0.5)"),
    "lanton_p05_median": ("lanton", {**P05, "ratio_stat": "median"}, LANTON_GRID, False,
                          "3. the median reference, r = min(1, (alpha/median)^0.5)"),
    "hybrid_p05_median": ("hybrid", {**P05, "ratio_stat": "median"}, LANTON_GRID, False,
                          "2 + 3. the hybrid with the median reference (p = 0.5)"),
    # Issue 40: the same rule with each layer refreshed on its own phase (1/K of each shape per step).
    "lanton_p05_median_staggered": ("lanton", {**P05, "ratio_stat": "median", "noise_schedule": "staggered"}, LANTON_GRID,
                                    False, "the default rule with the staggered noise schedule"),
    "lanton_p05_nesterov": ("lanton", {**P05, "beta1": 0.95, "nesterov": True}, LANTON_GRID, False,
                            "3. p = 0.5 with Muon's momentum (beta1 0.95, Nesterov) instead of 0.8, plain"),
    # The embed/vector groups' step relative to the hidden group's is the one factor the rate sweep
    # does not move; its default (half the hidden scale) was tuned with the paper's p = 1.
    "lanton_p05_ev1x": ("lanton", {**P05, "groups": "ev:1.0"}, LANTON_GRID, False,
                        "3. p = 0.5 with embeddings, head and vectors at the hidden scale (default: half)"),
    "lanton_p05_ev025x": ("lanton", {**P05, "groups": "ev:0.25"}, LANTON_GRID, False,
                          "3. p = 0.5 with embeddings, head and vectors at a quarter of the hidden scale"),
    # The noise tracker's time constant (K = 10 steps between estimates, beta2 0.9: a window of about
    # 100 steps) was tuned with p = 1; these bracket it at p = 0.5: fresher (K = 5) and smoother.
    "lanton_p05_k5": ("lanton", {**P05, "noise_every": 5}, LANTON_GRID, False,
                      "3. p = 0.5 with the noise estimated every 5 steps instead of 10"),
    "lanton_p05_b2_095": ("lanton", {**P05, "beta2": 0.95}, LANTON_GRID, False,
                          "3. p = 0.5 with the noise EMA at beta2 0.95 instead of 0.9"),
    "lanton_option2": ("lanton", {**P1, "noise_every": 1}, LANTON_GRID, True, "Option II: noise from a second gradient (2x samples)"),
    # Issue 41: lanton's default since 2026-12-07, the hybrid recipe in lanton's own kernels (NAdamW for
    # the non-hidden leaves at 0.4 x the rate: 3e-3 at 0.0075, the hybrid's Adam rate).
    "default": ("lanton", {"noise_schedule": "synchronous", "other": "adam"}, LANTON_GRID, False,
                "lanton's default (with the synchronous schedule, the default until 2026-12-08): the median rule (p = 0.5) on hidden matrices, fused NAdamW on the rest"),
    # Issue 40's check of the staggered schedule, redone with the default since 2026-12-07 (only the
    # hidden group measures noise there): the default with each hidden layer on its own phase, the
    # library's default since 2026-12-08 (decisions.md).
    "default_staggered": ("lanton", {"noise_schedule": "staggered", "other": "adam"}, LANTON_GRID, False,
                          "the default with noise_schedule=\"staggered\" (1/K of each shape's layers measured per step)"),
    # Issue 41's <= 0.8x ideas. 1: the median reference without its cap at 1 (the quieter half of
    # the hidden group steps faster than the base rate). The Adam part stays at 3e-3 (the default's at
    # 0.0075) whatever the hidden rate.
    "default_uncapped": ("lanton", {"noise_schedule": "synchronous", "other": "adam", "ratio_cap": math.inf,
                                    "adam_lr_fixed": True}, LANTON_GRID,
                         False, "idea 1: the default without the cap r <= 1 (ratio_cap = inf)"),
    # 2 (a screening): the Adam part's rate, a factor sqrt(2) either way of 3e-3 (0.4 x 0.0075, taken
    # from optax Muon's tuned Adam part, never swept for lanton's recipe).
    "default_adam_lo": ("lanton", {"noise_schedule": "synchronous", "other": "adam", "adam_lr_fixed": True,
                                   "adam_lr": 2.12e-3}, LANTON_GRID, False, "the default with the Adam part at 2.12e-3 (default 3e-3)"),
    "default_adam_hi": ("lanton", {"noise_schedule": "synchronous", "other": "adam", "adam_lr_fixed": True,
                                   "adam_lr": 4.24e-3}, LANTON_GRID, False, "the default with the Adam part at 4.24e-3 (default 3e-3)"),
    "default_adam_hi2": ("lanton", {"noise_schedule": "synchronous", "other": "adam", "adam_lr_fixed": True,
                                    "adam_lr": 6e-3}, LANTON_GRID, False, "the default with the Adam part at 6e-3 (default 3e-3)"),
    "lanton_p05_option2": ("lanton", {**P05, "noise_every": 1}, LANTON_GRID, True,
                           "Option II at p = 0.5: noise from a second gradient every step (2x samples)"),
}


def layer_stats(opt_state):
    """Per-layer noise H and ratio r of every lanton state inside the optimizer state (hybrids too)."""
    return {k: {"noise": np.asarray(v["noise"]).tolist(), "ratio": np.asarray(v["ratio"]).tolist()}
            for k, v in lanton.layer_stats(opt_state).items()}


def make_tx(variant, lr):
    base, kw, _, _, _ = VARIANTS[variant]
    kw = dict(kw)
    if kw.get("labels") == "split":
        kw["labels"] = lambda params: lanton.default_labels(params, split=True)
        kw["groups"] = {g: lanton.Group("hidden") for g in ("qk", "vo", "mlp")} | {
            "hidden": lanton.Group("hidden"), "embed": lanton.Group("embed"), "vector": lanton.Group("vector")}
    if isinstance(kw.get("groups"), str):  # "ev:F": embed and vector groups at F x the hidden scale
        factor = float(kw["groups"].split(":")[1])
        scale = kw.get("scale", 0.2)
        kw["groups"] = {**lanton.DEFAULT_GROUPS, "embed": lanton.Group("embed", scale=factor * scale),
                        "vector": lanton.Group("vector", scale=factor * scale)}
    return make(base, lr, **kw)


def train_score(r):
    """What the sweep minimizes: the mean training loss of the run's last 100 steps."""
    return float(np.mean(r["train_loss"][-100:]))


def best_rate(sweep):
    """The rate of {lr: run} with the lowest training score (the validation split is not used)."""
    return min(sweep, key=lambda lr: train_score(sweep[lr]))


def sweep(n, run, known):
    """Seed-0 runs {lr: run} of variant n's walk from its default rate (see the module's step 1), and
    what is missing when the budget stops it (else None). run(lr) trains or reuses a run (None once
    the budget is spent); known(lr) is the journal's run or None."""
    grid = sorted(VARIANTS[n][2])
    mid = grid[len(grid) // 2]
    down = [lr for lr in grid if lr < mid][::-1] + [grid[0] / 2, grid[0] / 4]
    up = [lr for lr in grid if lr > mid] + [grid[-1] * 2, grid[-1] * 4]
    pts = {lr: r for lr in down + up if (r := known(lr))}
    if (r := run(mid)) is None:
        return pts, f"sweep not started ({mid:g} not run yet)"
    pts[mid] = r
    for way in (down, up):
        prev = mid
        for lr in way:
            if (r := run(lr)) is None:
                return pts, f"sweep unfinished ({lr:g} not run yet)"
            pts[lr] = r
            if train_score(r) >= train_score(pts[prev]):
                break
            prev = lr
        if prev != mid:  # the minimum lies this way; the other side is worse (unimodal)
            break
    return pts, None


def refine_points(lr):
    """The factor-sqrt(2) neighbours of a walk's best rate (--refine), rounded to 3 digits."""
    return [float(f"{lr / 2 ** 0.5:.3g}"), float(f"{lr * 2 ** 0.5:.3g}")]


class Journal:
    """Finished runs keyed by (variant, lr, steps, seed, model), appended as JSON lines. A journal
    holds runs on one corpus (runs from before the field existed trained on the plays)."""

    def __init__(self, path: Path, corpus: str = "Shakespeare"):
        self.path, self.runs = path, {}
        if path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if (held := r.get("corpus", "Shakespeare")) != corpus:
                    raise SystemExit(f"{path} holds runs on {held}, these train on {corpus}: give them another --out or --journal")
                self.runs[self.key(r["variant"], r["lr"], r["steps"], r["seed"], r.get("model", {}))] = r

    @staticmethod
    def key(variant, lr, steps, seed, model):
        return json.dumps([variant, float(lr), int(steps), int(seed), model], sort_keys=True)

    def get(self, *k):
        return self.runs.get(self.key(*k))

    def add(self, r):
        self.runs[self.key(r["variant"], r["lr"], r["steps"], r["seed"], r["model"])] = r
        with self.path.open("a") as f:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--sweep-steps", type=int, help="sweep horizon (default: --steps)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--budget-minutes", type=float, default=float("inf"))
    ap.add_argument("--model", default="", help="overrides of the model, e.g. layers=8,d=256")
    ap.add_argument("--lr", default="", help="fixed rates that skip a variant's sweep (outside the protocol), e.g. hybrid=0.03")
    ap.add_argument("--only-seeds", default="", help="train only these seeds of the final runs (e.g. 1,2, to split "
                    "the work over workers); the others come from the journal or are reported missing")
    ap.add_argument("--refine", default="", help="variants whose sweep also runs the factor-sqrt(2) neighbours of the "
                    "walk's best rate, and picks the best of all (e.g. muon,lanton_p05)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "quality"))
    ap.add_argument("--journal", help="the runs file (default: OUT/runs.jsonl); another --out with the same journal "
                    "writes a second report from the same runs, e.g. with more seeds for a few rows")
    args = ap.parse_args()
    sweep_steps = args.sweep_steps or args.steps
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    model = model_overrides(args.model)
    only_seeds = {int(x) for x in args.only_seeds.split(",") if x}
    fixed = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)}
    refine = {n for n in args.refine.split(",") if n}
    if refine - set(names):
        ap.error(f"--refine names variants not in --variants: {sorted(refine - set(names))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(Path(args.journal) if args.journal else out / "runs.jsonl", corpus_name())
    corpus = load_corpus()
    t_start = time.time()

    budget_out = []

    def run(variant, lr, steps, seed):
        """The run from the journal, else trained now; None once the budget is spent."""
        done = journal.get(variant, lr, steps, seed, model)
        if done:
            return done
        if budget_out or (time.time() - t_start) / 60 > args.budget_minutes:
            budget_out.append((variant, lr, steps, seed))
            return None
        bar = tqdm(total=steps, desc=f"{variant} lr={lr:g} seed {seed} ({steps} steps)", ncols=110, mininterval=5) if tqdm else None
        prog = (lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))) if bar else None
        t0 = time.time()
        second = VARIANTS[variant][3]
        hist = train(make_tx(variant, lr), steps, seed=seed, corpus=corpus, eval_every=args.eval_every, progress=prog,
                     record_stats=layer_stats if variant != "muon" else None,
                     second_grad=second, model=model)
        if bar:
            bar.close()
        r = {"variant": variant, "lr": float(lr), "steps": steps, "seed": seed, "model": model, "corpus": corpus_name(),
             "seconds": time.time() - t0,
             "samples_per_step": 2 if second else 1, "date": datetime.date.today().isoformat(), **hist}
        journal.add(r)
        return r

    sweeps, best, finals, missing = {}, {}, {}, []
    for n in names:
        if n in fixed:
            best[n] = fixed[n]
            continue
        sweeps[n], problem = sweep(n, lambda lr: run(n, lr, sweep_steps, 0),
                                   lambda lr: journal.get(n, lr, sweep_steps, 0, model))
        for lr in refine_points(best_rate(sweeps[n])) if n in refine and not problem else []:
            if (r := run(n, lr, sweep_steps, 0)) is None:
                problem = f"refinement unfinished ({lr:g} not run yet)"
                break
            sweeps[n][lr] = r
        if problem:
            missing.append(f"{n}: {problem}")
            continue
        best[n] = best_rate(sweeps[n])
    sweeps = {n: {lr: {"train": train_score(r), "val": r["val_loss"][-1]} for lr, r in sorted(d.items())} for n, d in sweeps.items()}
    for seed in range(args.seeds):  # seed by seed, so a partial protocol has every variant's seed 0
        for n in (n for n in names if n in best):
            if only_seeds and seed not in only_seeds and not journal.get(n, best[n], args.steps, seed, model):
                missing.append(f"{n}: seed {seed} left to another worker (--only-seeds)")
                continue
            r = run(n, best[n], args.steps, seed)
            if r:
                finals.setdefault(n, []).append(r)
    if budget_out:
        missing.insert(0, f"the budget ran out ({len(budget_out)} runs not started)")
    report(args, names, sweeps, best, finals, missing, model, out, sweep_steps, fixed)


def report(args, names, sweeps, best, finals, missing, model, out, sweep_steps, fixed):
    import optax

    incomplete = [n for n in names if len(finals.get(n, [])) < args.seeds]
    ref = "muon" if finals.get("muon") else None
    target = float(np.mean([h["val_loss"][-1] for h in finals[ref]])) if ref else None
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__, "optax": optax.__version__, "lanton": lanton.__version__,
            "kernels": lanton.kernels_available(), "steps": args.steps, "sweep_steps": sweep_steps, "seeds": args.seeds,
            "model": model, "corpus": corpus_name()}
    swept = [n for n in names if n not in fixed]
    rates = (f"Learning rates swept at {sweep_steps} steps (seed 0){' for ' + ', '.join(swept) if fixed else ''}, then"
             if swept else "Learning rates fixed (no sweep), then")
    lines = [f"# Training quality: the ablation protocol ({meta['date']})", "",
             f"{'Shakespeare' if meta['corpus'] == 'Shakespeare' else 'Text of `' + meta['corpus'] + '`,'} byte-level GPT{' ' + str(model) if model else ''}, batch 32 x 128 bytes, warm-up then cosine, "
             f"clip 1.0. {rates} {args.steps} steps x {args.seeds} seeds "
             f"at the {'best ' if swept else ''}rate. Machine: {meta['machine']}, {meta['backend']} ({meta['device']}), jax {meta['jax']}, optax {meta['optax']}, "
             f"lanton {meta['lanton']} (fused kernels: {meta['kernels']}). Command: "
             f"`python benches/quality.py {shlex.join(sys.argv[1:])}`.", ""]
    if fixed:
        lines += [f"**Outside the protocol:** fixed rates, no sweep, for {', '.join(f'{k} ({v:g})' for k, v in fixed.items())}.", ""]
    if incomplete or missing:
        lines += [f"**Partial:** {'; '.join(missing) or 'not every run is done'}. Variants with fewer than {args.seeds} "
                  f"finished final runs: {', '.join(incomplete) or 'none'}. Run the same command again to continue.", ""]
    lines += [f"Target: tuned Muon's seed-mean final validation loss, "
              f"{'%.4f' % target if target is not None else 'not yet measured'}.", "",
              "| variant | what it isolates | lr | seeds | final val loss (mean) | spread (max-min) | per-seed finals | "
              "steps to target per seed | steps to target (mean curve) | vs muon | ms/step |",
              "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    summary = {}
    for n in names:
        runs = finals.get(n, [])
        if not runs:
            lines.append(f"| {n} | {VARIANTS[n][4]} | {best.get(n, '-')} | 0 | - | - | - | - | - | - | - |")
            continue
        fin = [h["val_loss"][-1] for h in runs]
        mean_curve = {"val_step": runs[0]["val_step"], "val_loss": np.mean([h["val_loss"] for h in runs], axis=0).tolist()}
        reach = steps_to(mean_curve, target) if target is not None else None
        per_seed = [steps_to(h, target) if target is not None else None for h in runs]
        summary[n] = {"lr": best[n], "finals": fin, "mean": float(np.mean(fin)), "spread": float(max(fin) - min(fin)),
                      "steps_to_target": per_seed, "steps_to_target_mean_curve": reach,
                      "ms_per_step": 1000 * float(np.mean([h["seconds_per_step"] for h in runs]))}
        fmt = lambda s: "-" if s is None else f"{s:.0f}"
        ref_reach = summary.get("muon", {}).get("steps_to_target_mean_curve")
        lines.append(f"| {n} | {VARIANTS[n][4]} | {best[n]:g} | {len(runs)} | {np.mean(fin):.4f} | {f'{max(fin) - min(fin):.4f}' if len(fin) > 1 else '-'} | "
                     f"{', '.join(f'{v:.4f}' for v in fin)} | {', '.join(fmt(s) for s in per_seed)} | {fmt(reach)} | "
                     f"{'-' if reach is None or not ref_reach else f'{reach / ref_reach:.2f}x'} | {summary[n]['ms_per_step']:.0f} |")
    if sweeps:
        lines += ["", f"Sweep (seed 0, {sweep_steps} steps; the rate is picked by the training loss of the last 100 steps, "
                  "the validation loss is shown, not used):", ""]
    if args.refine:
        lines += [f"Refined (the factor-sqrt(2) neighbours of the walk's best also run): {args.refine}.", ""]
    lines += [f"- {n}: " + ", ".join(f"lr {k:g}: train {v['train']:.4f}, val {v['val']:.4f}" for k, v in d.items())
              for n, d in sweeps.items()]
    lines += ["", "Option II draws two batches per step: per sample it has seen twice the data of the others at the "
              "same step.", "", "![validation loss](val_loss.png)", ""]
    (out / "results.json").write_text(json.dumps({"meta": meta, "sweeps": {n: {str(k): v for k, v in d.items()} for n, d in sweeps.items()},
                                                  "grids": {n: VARIANTS[n][2] for n in sweeps},
                                                  "best_lr": best, "summary": summary, "target": target}, indent=1))
    plot(finals, out, target)
    # Notes written by hand below the generated part survive a re-run.
    path, mark = out / "report.md", "Notes (added by hand)"
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(mark):] if mark in old else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines))


def plot(finals, out, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (n, runs) in enumerate(finals.items()):
        if runs:
            ax.plot(runs[0]["val_step"], np.mean([h["val_loss"] for h in runs], axis=0), label=f"{n} ({len(runs)} seeds)", color=f"C{i}")
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label="tuned Muon final")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte), seed mean")
    ax.set_ylim(top=min(2.2, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
