"""Convergence benchmark (../shared/BENCHMARKS.md): the Shakespeare byte-level GPT trained with
lanton, lanton noise-off, optax.contrib.muon (hidden-only, tuned Adam part) and AdamW.

1. the same learning-rate sweep for every optimizer at a shorter horizon (--sweep-steps);
2. the best rate of each, trained for --steps with --seeds seeds;
3. results as JSON, PNG plots (val loss vs step and vs wall clock; lanton's per-layer noise H
   and ratio r over training, grouped QK / VO / MLP) and a Markdown report with final losses and
   steps-to-target (steps to reach tuned Muon's final val loss).

Full run (about 1.5 h on the 2-core CPU):   python benches/convergence.py
Preliminary, no sweep:                      python benches/convergence.py --sweep-steps 0 --seeds 1
One optimizer at a fixed rate against a known target (e.g. lanton at its default rate vs the
full run's tuned-Muon loss):
    python benches/convergence.py --optimizers lanton --lr lanton=0.03 --target 1.5180 --out DIR
Smoke run (a minute):                       python benches/convergence.py --steps 40 --sweep-steps 20 --seeds 1 --out /tmp/conv
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lanton  # noqa: E402
from gpt import load_corpus, train  # noqa: E402
from optimizers import DEFAULT_LR, make  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

SWEEP = {
    # The same grid for everyone: half, once and twice the default rate.
    "lanton": [0.015, 0.03, 0.06],
    "lanton_noise_off": [0.015, 0.03, 0.06],
    "muon": [0.01, 0.02, 0.04],
    "adamw": [1.5e-3, 3e-3, 6e-3],
}


def lanton_stats(opt_state):
    st = opt_state[1]  # chain(clip, lanton)
    return {k: {"noise": np.asarray(v["noise"]).tolist(), "ratio": np.asarray(v["ratio"]).tolist()}
            for k, v in lanton.layer_stats(st).items()}


def run(name, lr, steps, seed, corpus, eval_every, desc):
    bar = tqdm(total=steps, desc=desc, ncols=100, mininterval=5) if tqdm else None
    prog = (lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))) if bar else None
    hist = train(make(name, lr), steps, seed=seed, corpus=corpus, eval_every=eval_every, progress=prog,
                 record_stats=lanton_stats if name.startswith("lanton") else None)
    if bar:
        bar.close()
    hist.update(optimizer=name, lr=lr, seed=seed)
    return hist


def steps_to(hist, target):
    """First step where val loss <= target, interpolated between evaluations; None if never."""
    prev_s, prev_v = 0, None
    for s, v in zip(hist["val_step"], hist["val_loss"]):
        if v <= target:
            if prev_v is None or prev_v == v:
                return float(s)
            return prev_s + (s - prev_s) * (prev_v - target) / (prev_v - v)
        prev_s, prev_v = s, v
    return None


def group_of(path):
    last = path.split("/")[-1]
    return {"q": "QK", "k": "QK", "v": "VO", "o": "VO", "fc": "MLP", "proj": "MLP"}.get(last)


def plots(final, out, target, target_label="tuned Muon final"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in final.items():
        for i, h in enumerate(runs):
            kw = dict(label=name if i == 0 else None, alpha=0.85, color=f"C{list(final).index(name)}")
            axes[0].plot(h["val_step"], h["val_loss"], **kw)
            axes[1].plot(h["val_time"], h["val_loss"], **kw)
    for ax, xl in zip(axes, ("step", "training wall clock (s)")):
        ax.axhline(target, color="gray", ls=":", lw=1, label=target_label)
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_ylim(top=min(2.6, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    plt.close(fig)

    runs = final.get("lanton")
    if not runs or not runs[0]["stats"]:
        return
    stats = runs[0]["stats"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    for col, grp in enumerate(("QK", "VO", "MLP")):
        for path in stats[0]:
            if group_of(path) != grp or path == "step":
                continue
            xs = [s["step"] for s in stats]
            axes[0, col].plot(xs, [np.sqrt(s[path]["noise"]) for s in stats], label=path)
            axes[1, col].plot(xs, [s[path]["ratio"] for s in stats], label=path)
        axes[0, col].set_title(f"{grp}: noise sqrt(H)")
        axes[1, col].set_title(f"{grp}: ratio r")
        axes[1, col].set_xlabel("step")
        axes[0, col].set_yscale("log")
        axes[0, col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "lanton_noise.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--sweep-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--optimizers", default=",".join(SWEEP))
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", default="", help="fixed rates that skip the sweep, e.g. lanton=0.03")
    ap.add_argument("--target", type=float, help="target val loss (default: this run's tuned muon final loss)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "convergence"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    names = args.optimizers.split(",")
    import inspect

    import optax

    defaults = {k: p.default for k, p in inspect.signature(lanton.lanton).parameters.items()
                if k in ("beta1", "beta2", "weight_decay", "scale", "noise_every", "ratio_stat", "nesterov")}
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpus": __import__("os").cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
            "optax": optax.__version__, "lanton": lanton.__version__, "lanton_defaults": defaults,
            "kernels": lanton.kernels_available(), "steps": args.steps, "sweep_steps": args.sweep_steps, "seeds": args.seeds}

    fixed = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)}
    sweep = {}
    if args.sweep_steps > 0:
        for name in (n for n in names if n not in fixed):
            sweep[name] = {}
            for lr in SWEEP[name]:
                h = run(name, lr, args.sweep_steps, 0, corpus, args.eval_every, f"sweep {name} lr={lr:g}")
                sweep[name][lr] = h["val_loss"][-1]
    # Without a sweep: the libraries' default rates (a preliminary comparison, not a tuned one).
    best = {n: fixed[n] if n in fixed else min(sweep[n], key=sweep[n].get) if n in sweep else DEFAULT_LR[n]
            for n in names}
    print("learning rates:", best)

    final = {n: [run(n, best[n], args.steps, s, corpus, args.eval_every, f"{n} seed {s}") for s in range(args.seeds)] for n in names}
    (out / "results.json").write_text(json.dumps({"meta": meta, "sweep": {n: {str(k): v for k, v in d.items()} for n, d in sweep.items()},
                                                  "best_lr": best, "runs": final}))

    ref = "muon" if "muon" in final else names[0]
    tuned = "tuned " if sweep else "untuned (default-rate) "
    if args.target is None:
        target = float(np.mean([h["val_loss"][-1] for h in final[ref]]))
        target_label, plot_label = f"{tuned}{ref}'s mean final validation loss", f"{tuned}{ref} final"
    else:
        target, target_label, plot_label = args.target, "the given target loss (--target)", "target"
    plots(final, out, target, plot_label)
    lines = [f"# Convergence: Shakespeare byte-level GPT ({meta['date']})", "",
             f"Machine: {meta['machine']} ({meta['cpus']} cores), {meta['backend']}, jax {meta['jax']}, optax {meta['optax']}, "
             f"lanton {meta['lanton']} (fused kernels: {meta['kernels']}; defaults {meta['lanton_defaults']}, group scales "
             f"factors {lanton._transform.KIND_SCALE}). {args.steps} steps, batch 32 x 128 bytes, warm-up then cosine, "
             f"clip 1.0; " + (f"learning rates swept at {args.sweep_steps} steps" if sweep
                 else "fixed learning rates, no sweep" if fixed else "NO learning-rate sweep (default rates)")
             + f"; {args.seeds} seed(s).", "",
             f"Target: {target_label}, {target:.4f}." + (f" Fixed rates (no sweep): {fixed}." if fixed else ""), "",
             "| optimizer | lr | final val loss (mean) | seed spread | steps to target (seed-mean curve) | vs muon | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for n, runs in final.items():
        # Steps to target on the seed-averaged curve (the target is Muon's seed-mean final loss,
        # so Muon's own averaged curve reaches it exactly at its last evaluation).
        mean_curve = {"val_step": runs[0]["val_step"], "val_loss": np.mean([h["val_loss"] for h in runs], axis=0).tolist()}
        summary[n] = (float(np.mean([h["val_loss"][-1] for h in runs])), steps_to(mean_curve, target))
    for n, runs in final.items():
        finals = [h["val_loss"][-1] for h in runs]
        mean_reach, ref_reach = summary[n][1], summary.get(ref, (0, None))[1]
        ms = 1000 * np.mean([h["seconds_per_step"] for h in runs])
        lines.append(f"| {n} | {best[n]:g} | {np.mean(finals):.4f} | {max(finals) - min(finals):.4f} | "
                     f"{'not reached' if mean_reach is None else f'{mean_reach:.0f}'} | "
                     f"{'-' if mean_reach is None or ref_reach is None else f'{mean_reach / ref_reach:.2f}x'} | {ms:.0f} |")
    if sweep:
        lines += ["", "Sweep (final val loss at the sweep horizon):", ""]
    for n, d in sweep.items():
        lines.append(f"- {n}: " + ", ".join(f"lr {k:g}: {v:.4f}" for k, v in d.items()))
    if "lanton" in summary and ref in summary and ref != "lanton":
        (lf, ls), (mf, ms_) = summary["lanton"], summary[ref]
        verdict = "beats" if lf < mf else "does not beat"
        lines += ["", f"**Verdict:** lanton {verdict} {tuned}{ref} on final validation loss ({lf:.4f} vs {mf:.4f}, "
                  f"difference {lf - mf:+.4f}); steps to reach {ref}'s final loss: "
                  f"{'not reached' if ls is None else f'{ls:.0f} ({ls / ms_:.2f}x of {ms_:.0f})'} (goal: <= 0.8x)."]
        spread = lambda n: max(h["val_loss"][-1] for h in final[n]) - min(h["val_loss"][-1] for h in final[n])
        lines.append(f"Seed spread (max - min final loss over {args.seeds} seeds): lanton {spread('lanton'):.4f}, "
                     f"{ref} {spread(ref):.4f}.")
        if "lanton_noise_off" in summary:
            nf, ns = summary["lanton_noise_off"]
            lines.append(f"Noise adaptation vs noise-off lanton: final {lf:.4f} vs {nf:.4f} ({lf - nf:+.4f}, noise-off "
                         f"seed spread {spread('lanton_noise_off'):.4f}); steps to {ref}'s final loss: "
                         f"{'not reached' if ls is None else f'{ls:.0f}'} vs {'not reached' if ns is None else f'{ns:.0f}'}.")
    lines += ["", "![validation loss](val_loss.png)", "", "![lanton per-layer noise and ratio](lanton_noise.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
