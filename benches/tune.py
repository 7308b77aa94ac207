"""Tunes lanton's defaults on the Shakespeare GPT (../shared/BENCHMARKS.md) within a fixed budget.

Greedy, one knob per stage, each candidate trained once (seed 0) for --steps steps with the
benchmark's schedule; the best final validation loss so far is carried into the next stage.
Budget: 14 short runs (--steps 400: about 3 min each on the 2-core CPU). What was tried and
what won is written to tune.json and tune.md in --out; the winner becomes lanton's defaults
(by hand: see the report).

    python benches/tune.py                      # the recorded run
    python benches/tune.py --steps 30 --out /tmp/tune   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import lanton  # noqa: E402
from gpt import load_corpus, schedule, train  # noqa: E402


def split_labels(params):
    return lanton.default_labels(params, split=True)


def single_labels(params):
    return lanton.default_labels(params, split=False)


# Each stage: knob name -> candidate values (the first is the incumbent's value at the start).
STAGES = [
    ("lr", [0.02, 0.01, 0.04]),
    ("labels", ["single", "split"]),
    ("ratio_stat", ["max", "mean"]),
    ("side_scale", [0.2, 0.1, 0.4]),  # embed and vector groups' scale (hidden keeps 0.2)
    ("beta2", [0.9, 0.99]),
    ("beta1", [0.95, 0.9, 0.8]),
    ("nesterov", [False, True]),
    ("lr", [0.02, 0.03]),  # again: the betas change the effective step
    ("noise_every", [10, 5, 20]),  # K: how often the noise estimate is refreshed
]
BASE = {"lr": 0.02, "labels": "single", "ratio_stat": "max", "side_scale": 0.2, "beta2": 0.9, "beta1": 0.95,
        "nesterov": False, "noise_every": 10}


NOTES_MARK = "Notes (added by hand)"


def make_tx(cfg):
    labels = split_labels if cfg["labels"] == "split" else single_labels
    groups = {g: lanton.Group("hidden") for g in ("hidden", "qk", "vo", "mlp")}
    groups.update(embed=lanton.Group("embed", scale=cfg["side_scale"]),
                  vector=lanton.Group("vector", scale=cfg["side_scale"]))
    return lambda steps: lanton.lanton(
        learning_rate=schedule(cfg["lr"], steps), beta1=cfg["beta1"], beta2=cfg["beta2"],
        ratio_stat=cfg["ratio_stat"], nesterov=cfg["nesterov"], noise_every=cfg["noise_every"], labels=labels,
        groups=groups)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tuning"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    tried = {}
    # Finished runs are appended to runs.jsonl, so an interrupted search resumes where it stopped.
    journal = out / "runs.jsonl"
    if journal.exists():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            if r.get("steps") == args.steps:
                r["config"] = {**BASE, **r["config"]}  # knobs added later take their base value
                tried[json.dumps(r["config"], sort_keys=True)] = r

    def evaluate(cfg):
        key = json.dumps(cfg, sort_keys=True)
        if key not in tried:
            t0 = time.time()
            hist = train(make_tx(cfg), args.steps, seed=0, corpus=corpus, eval_every=max(args.steps // 4, 1))
            tried[key] = {"config": dict(cfg), "val_loss": hist["val_loss"][-1], "seconds": time.time() - t0,
                          "steps": args.steps}
            with journal.open("a") as f:
                f.write(json.dumps(tried[key]) + "\n")
        print(f"  {cfg} -> val {tried[key]['val_loss']:.4f} ({tried[key]['seconds']:.0f} s)", flush=True)
        return tried[key]["val_loss"]

    best = dict(BASE)
    best_loss = evaluate(best)
    log = []
    for knob, values in STAGES:
        print(f"stage {knob}: {values}", flush=True)
        for v in values:
            cand = {**best, knob: v}
            loss = evaluate(cand)
            if loss < best_loss - 1e-4:
                best, best_loss = cand, loss
        log.append({"knob": knob, "values": values, "chosen": best[knob], "best_loss": best_loss})

    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {jax.default_backend()}",
            "jax": jax.__version__, "steps": args.steps, "seed": 0, "runs": len(tried),
            "fused_kernels": lanton.kernels_available()}
    (out / "tune.json").write_text(json.dumps({"meta": meta, "stages": log, "tried": list(tried.values()),
                                              "best": best, "best_loss": best_loss}, indent=1))
    lines = [f"# lanton tuning on the Shakespeare GPT ({meta['date']})", "",
             f"Greedy search, one knob per stage, {args.steps} steps per run (same schedule, clip and data as the "
             f"convergence benchmark), seed 0, {len(tried)} runs. Machine: {meta['machine']}, jax {meta['jax']}.",
             "Command: `python benches/tune.py`.", "",
             "| run | lr | labels | ratio_stat | embed/vector scale | beta2 | beta1 | nesterov | K | val loss | s |",
             "|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for i, r in enumerate(tried.values(), 1):
        c = r["config"]
        lines.append(f"| {i} | {c['lr']} | {c['labels']} | {c['ratio_stat']} | {c['side_scale']} | {c['beta2']} | "
                     f"{c['beta1']} | {c['nesterov']} | {c['noise_every']} | {r['val_loss']:.4f} | {r['seconds']:.0f} |")
    lines += ["", "Chosen per stage: " + ", ".join(f"{s['knob']}={s['chosen']}" for s in log) + ".",
              f"Best: {best} (val {best_loss:.4f})."]
    # Notes written by hand below the generated part survive a re-run.
    report = out / "tune.md"
    old = report.read_text() if report.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    report.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
