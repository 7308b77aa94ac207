"""Where one optimizer step's time goes: wall time against device time, from jax's profiler.

For each row (names of `benches/step_time.py`'s contenders) on one parameter set: a few warm steps
(the same jitted, donated `update + apply_updates` as step_time.py) under `jax.profiler.trace`,
then from its Perfetto trace: the wall time per step (timed on the host), the device's busy time
per step (the union of the kernels' intervals on every GPU stream, so overlapping streams count
once), the kernels launched per step, and the kernels that take the most device time. Wall time
well above device time means the step is host-bound (launch and dispatch overhead); device time
well above the lower bound means the kernels themselves are slow. On CPU there are no device
tracks: the table says so and gives the wall time only.

    python benches/step_profile.py --set gpt2 --rows "lanton K=10;optax muon (hidden only)" \
        --steps 10 --out benches/results/step_profile_gpu

Written without a GPU (2026-12-07): the trace parsing is tested on synthetic GPU events and the
script end to end on CPU; its GPU figures come from the first run on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from report import emit  # noqa: E402
from step_time import ROW_ENV, contenders, param_set, stepper  # noqa: E402


def trace_events(trace_dir):
    """The events of the Perfetto trace jax.profiler wrote under `trace_dir`."""
    paths = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_summary(events, steps):
    """Per step: device busy seconds (union of kernel intervals on GPU processes), kernels
    launched, and the top kernels by device time; None when the trace has no GPU device."""
    gpu_pids = {e["pid"] for e in events
                if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:GPU" in e.get("args", {}).get("name", "")}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and e.get("dur", 0) > 0]
    if not kernels:
        return None
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)  # microseconds
    busy, end = 0.0, None
    for start, stop in spans:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    by_name = defaultdict(float)
    for e in kernels:
        by_name[e["name"]] += e["dur"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"busy_s": busy * 1e-6 / steps, "kernels": len(kernels) / steps,
            "top": [{"name": n, "s_per_step": d * 1e-6 / steps} for n, d in top]}


def profile_row(kind, make, params, grad_sets, steps):
    """Wall seconds per step and the device summary of `steps` warm steps."""
    timed = stepper(kind, make, params, grad_sets)  # compiled and warm
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            timed(steps)
            wall = (time.perf_counter() - t0) / steps
        return wall, device_summary(trace_events(d), steps)


def render(meta, rows):
    lines = [f"# Step profile ({meta['date']}, {meta['backend']}: {meta['device']}, jax {meta['jax']}, set {meta['set']})", "",
             f"{meta['steps']} warm steps per row under jax.profiler; device time = the union of the kernels' "
             "intervals on the GPU's streams, per step.", "",
             "| row | wall ms / step | device ms / step | device / wall | kernels / step |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        dev = r["device"]
        if dev is None:
            lines.append(f"| {name} | {1000 * r['wall_s']:.2f} | no device tracks | - | - |")
        else:
            lines.append(f"| {name} | {1000 * r['wall_s']:.2f} | {1000 * dev['busy_s']:.2f} | "
                         f"{dev['busy_s'] / r['wall_s']:.2f} | {dev['kernels']:.0f} |")
    for name, r in rows.items():
        if r["device"]:
            lines += ["", f"## {name}: kernels by device time", "", "| kernel | ms / step |", "|---|---:|"]
            lines += [f"| `{k['name'][:90]}` | {1000 * k['s_per_step']:.3f} |" for k in r["device"]["top"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="gpt2")
    ap.add_argument("--rows", default="lanton K=10;lanton noise off;optax muon (hidden only)",
                    help="step_time.py contender names separated by ';'")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="path prefix for .json and .md results")
    args = ap.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "set": args.set, "steps": args.steps}
    params = param_set(args.set)
    leaves, tdef = jax.tree.flatten(params)
    grad_sets = [tdef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                                 for k, x in zip(jax.random.split(jax.random.key(seed), len(leaves)), leaves)])
                 for seed in (1, 2)]
    known = contenders()
    rows = {}
    for name in args.rows.split(";"):
        if name not in known:
            raise SystemExit(f"unknown row {name!r}; step_time.py's rows: {'; '.join(known)}")
        if name in ROW_ENV:
            raise SystemExit(f"row {name!r} needs environment variables; profile it from its own process")
        kind, make = known[name]
        wall, dev = profile_row(kind, make, params, grad_sets, args.steps)
        rows[name] = {"wall_s": wall, "device": dev}
        print(f"  {name:<30} wall {1000 * wall:9.2f} ms" + (f", device {1000 * dev['busy_s']:9.2f} ms" if dev else ""), flush=True)
        # Saved after each row: a run cut short keeps what it measured.
        emit(render(meta, rows), {"meta": meta, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
