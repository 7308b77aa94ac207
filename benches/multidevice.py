"""Step time under sharding on virtual CPU devices: lanton with mesh=False (every device repeats
the step), lanton with `mesh=` (the Newton-Schulz work divided among the devices), lanton's
default (the same split over the mesh the inputs are laid out on) and optax.contrib.muon
(hidden only), each with parameters, gradients and state laid out the same
way: replicated (data parallel) and FSDP (2-D leaves sharded on their first axis). Ratios to
optax Muon from the same run. The devices share this machine's cores, so absolute times mean
little; the ratios show who repeats work.

    python benches/multidevice.py --devices 8 --out benches/results/multidevice_cpu
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # the device count must be set before jax starts
    n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), None)
    if n is None and "--devices" in sys.argv:
        n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n or 8}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))
import lanton  # noqa: E402
from gpt import init_params  # noqa: E402
from optimizers import hidden_only_dims  # noqa: E402
from report import emit  # noqa: E402


def layouts(mesh):
    data = lambda x: P()
    fsdp = lambda x: P("d", *([None] * (x.ndim - 1))) if x.ndim == 2 and x.shape[0] % mesh.size == 0 else P()
    return {"data parallel (replicated)": data, "FSDP (d_in sharded)": fsdp}


def contenders(mesh):
    return {
        "lanton, mesh=False (repeated)": lambda: lanton.lanton(0.02, mesh=False),
        "lanton, mesh= (split)": lambda: lanton.lanton(0.02, mesh=mesh),
        "lanton, default (inputs' mesh)": lambda: lanton.lanton(0.02),
        "optax muon (hidden only)": lambda: optax.contrib.muon(0.02, adam_learning_rate=3e-3,
                                                               muon_weight_dimension_numbers=hidden_only_dims),
    }


def time_step(tx, params, grads, spec, mesh, repeats):
    shard = lambda tree: jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), tree)
    ps = shard(params)
    state = tx.init(params)
    ss = jax.tree.map(lambda x: NamedSharding(mesh, spec(x) if x.ndim == 2 else P()), state)
    p, s = jax.device_put(jax.tree.map(jnp.copy, params), ps), jax.device_put(state, ss)  # donated below
    g = [jax.device_put(x, ps) for x in grads]

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    f = jax.jit(step, in_shardings=(ps, ss, ps), out_shardings=(ps, ss), donate_argnums=(0, 1))
    for i in range(2):
        p, s = jax.block_until_ready(f(p, s, g[i % 2]))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        p, s = jax.block_until_ready(f(p, s, g[i % 2]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--d", type=int, default=256, help="model width (the demo model's layout, 4 layers)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # An automatic (GSPMD) mesh: optax Muon does not trace under explicit sharding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    params = init_params(jax.random.key(0), layers=4, d=args.d, ctx=128, vocab=256)
    leaves, tdef = jax.tree.flatten(params)
    grads = [tdef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(jax.random.split(jax.random.key(s), len(leaves)), leaves)])
             for s in (1, 2)]
    meta = {"date": datetime.date.today().isoformat(), "devices": jax.device_count(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "d": args.d, "repeats": args.repeats,
            "params": int(sum(x.size for x in leaves))}
    print(json.dumps(meta), flush=True)
    results = {}
    for lname, spec in layouts(mesh).items():
        rows = {}
        for name, make in contenders(mesh).items():
            runs0 = lanton._ffi.newton_schulz_runs()
            rows[name] = {"seconds": time_step(make(), params, grads, spec, mesh, args.repeats),
                          "ns_runs": lanton._ffi.newton_schulz_runs() - runs0}
            print(f"  {lname:<28} {name:<28} {1000 * rows[name]['seconds']:9.1f} ms", flush=True)
        results[lname] = rows
    base = "optax muon (hidden only)"
    lines = [f"# Step time under sharding ({meta['date']}, {meta['devices']} virtual CPU devices on {meta['cpus']} cores, "
             f"jax {meta['jax']})", "",
             f"The demo model's layout at d = {args.d} ({meta['params'] / 1e6:.2f} M params), jitted update + "
             f"apply_updates with params and state donated, median of {args.repeats} warm steps; ratio: time / {base}, "
             "same run. NS runs: Newton-Schulz directions lanton's kernels computed over the warm-up and timed steps, "
             "all devices together.", ""]
    for lname, rows in results.items():
        lines += [f"## {lname}", "", "| optimizer | ms / step | ratio | NS runs |", "|---|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {1000 * r['seconds']:.1f} | {r['seconds'] / rows[base]['seconds']:.2f} | "
                         f"{r['ns_runs'] if name.startswith('lanton') else '-'} |")
        lines.append("")
    emit("\n".join(lines), {"meta": meta, "results": results}, args.out)


if __name__ == "__main__":
    main()
