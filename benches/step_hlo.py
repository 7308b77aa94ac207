"""The compiled optimizer step as XLA sees it: how many arrays it takes and how many custom calls,
fusions and instructions its entry computation runs, for lanton's rows and optax Muon's on the
same parameters (issue 40's host overhead: on a GPU every array passed and every launch costs host
time, and the GPT-2-small step measured ~8x its lower bound with ~1,800 arrays through its calls).

The step is the jitted, donated `update + apply_updates` of benches/step_time.py (`lanton.fused`'s
own step for the in-place row), compiled for this machine's backend: on CPU the counts are the
program's shape (a GPU compile fuses differently, but passes the same arrays to the same custom
calls).

    python benches/step_hlo.py --sets tiny,gpt2 --out benches/results/step_hlo_cpu
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

from report import emit  # noqa: E402
from step_time import contenders, donated_step, param_set  # noqa: E402

ROWS = "lanton K=10;lanton in-place K=10;lanton noise off;optax muon (hidden only);optax adamw"


def entry_computation(hlo_text):
    """The lines of the ENTRY computation of an HLO module's text."""
    lines = hlo_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY "))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        body.append(line)
    return body


def hlo_counts(hlo_text):
    """Instructions, fusions, custom calls (by target) of the entry computation."""
    body = [line for line in entry_computation(hlo_text) if " = " in line]
    targets = [m.group(1) for line in body for m in [re.search(r'custom_call_target="([^"]+)"', line)] if m]
    return {"instructions": len(body),
            "fusions": sum(1 for line in body if re.search(r"\bfusion\(", line)),
            "custom_calls": len(targets),
            "custom_call_targets": sorted(set(targets))}


def compiled_step(kind, make, params, grads):
    """(HLO text of the compiled step, number of state arrays)."""
    if kind == "fused":
        fz = make()
        state = fz.init(params)
        fn = jax.jit(fz.step, donate_argnums=(1, 2))
        args = (grads, state, params)
    else:
        tx = make()
        state = tx.init(params)
        fn = donated_step(tx)
        args = (params, state, grads)
    return fn.lower(*args).compile().as_text(), len(jax.tree.leaves(state))


def render(meta, results):
    lines = [f"# The compiled step's arrays and instructions ({meta['date']}, {meta['backend']}, jax {meta['jax']})", "",
             "Entry computation of the jitted, donated update + apply_updates; arrays in = params + state + grads.", ""]
    for set_name, r in results.items():
        lines += [f"## {set_name} ({r['leaves']} parameter leaves)", "",
                  "| row | state arrays | arrays in | custom calls | fusions | instructions |", "|---|---:|---:|---:|---:|---:|"]
        for name, c in r["rows"].items():
            lines.append(f"| {name} | {c['state_arrays']} | {c['arrays_in']} | {c['custom_calls']} | {c['fusions']} | "
                         f"{c['instructions']} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="tiny,gpt2")
    ap.add_argument("--rows", default=ROWS, help="step_time.py contender names separated by ';'")
    ap.add_argument("--out", default=None, help="path prefix for .json and .md results")
    args = ap.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(), "jax": jax.__version__}
    known = contenders()
    results = {}
    for set_name in args.sets.split(","):
        params = param_set(set_name)
        leaves = jax.tree.leaves(params)
        rows = {}
        for name in args.rows.split(";"):
            kind, make = known[name]
            text, n_state = compiled_step(kind, make, params, params)
            rows[name] = {"state_arrays": n_state, "arrays_in": 2 * len(leaves) + n_state, **hlo_counts(text)}
            print(f"  {set_name:>6} {name:<28} {rows[name]}", flush=True)
        results[set_name] = {"leaves": len(leaves), "rows": rows}
        emit(render(meta, results), {"meta": meta, "results": results}, args.out)


if __name__ == "__main__":
    main()
