"""GPU checks that the test suite cannot make from inside one process (run by tests/gpu/run.sh;
written on a machine without a GPU and not yet run on one):

  python tests/gpu/graph_check.py dump OUT.npz   # 50 donated lanton.fused steps + 20 update steps
                                                 # per dtype (f32, bf16, f16), params saved
  python tests/gpu/graph_check.py compare A B    # bitwise equality of two dumps
  python tests/gpu/graph_check.py no-sync        # the compiled steady-state step has no
                                                 # conditional (XLA copies its predicate to the host)
                                                 # and no transfer to or from the host

run.sh dumps once with command buffers forced on for every custom call and once with them off:
a call recorded into a CUDA graph must replay into the same memory and give the same bits.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lanton

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def model(dtype):
    ks = iter(jax.random.split(jax.random.key(0), 64))
    n = lambda *s: (0.1 * jax.random.normal(next(ks), s)).astype(dtype)
    p = {"wte": n(300, 64), "lm_head": n(64, 300), "ln_f": {"scale": 1 + n(64)}}
    for i in range(3):
        p[f"block{i}"] = {"q": n(64, 64), "fc": n(64, 256), "proj": n(256, 64), "bias": n(256)}
    p["scanned"] = {"kernel": n(4, 64, 96)}
    return p


def grads(params, t):
    leaves, tdef = jax.tree.flatten(params)
    ks = jax.random.split(jax.random.key(1000 + t), len(leaves))
    return tdef.unflatten([jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(ks, leaves)])


def dump(path):
    out = {}
    for name, dtype in DTYPES.items():
        p0 = model(dtype)
        fz = lanton.fused(0.02, weight_decay=0.01, noise_every=3)
        p, s = jax.tree.map(jnp.copy, p0), fz.init(p0)
        for t in range(50):  # donated in place, the steady state a CUDA graph replays
            p, s = fz.step(grads(p0, t % 7), s, p)
        tx = lanton.lanton(0.02, noise_every=3)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
                       donate_argnums=(0, 1))
        q, r = jax.tree.map(jnp.copy, p0), tx.init(p0)
        for t in range(20):
            q, r = step(q, r, grads(p0, t % 5))
        for tag, tree in (("fused", p), ("update", q)):
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
                arr = np.asarray(v.astype(jnp.float32))
                assert np.isfinite(arr).all(), f"{name} {tag} {jax.tree_util.keystr(k)} not finite"
                out[f"{name}/{tag}/{jax.tree_util.keystr(k)}"] = arr
    np.savez(path, **out)
    print(f"dumped {len(out)} arrays to {path}")


def compare(a, b):
    x, y = np.load(a), np.load(b)
    assert sorted(x.files) == sorted(y.files), "different arrays"
    bad = [k for k in x.files if not np.array_equal(x[k], y[k])]
    if bad:
        sys.exit(f"FAIL: {len(bad)} of {len(x.files)} arrays differ bitwise between {a} and {b}, e.g. {bad[:3]}")
    print(f"bitwise equal: {len(x.files)} arrays")


def host_syncs(hlo_text):
    """Lines of a compiled HLO module that make a step wait for the device: a conditional (XLA
    copies its predicate to the host), an outfeed/infeed/send/recv, or a buffer moved to host
    memory (MoveToHost, memory space S(5)). tests/python/test_compiled.py checks it on CPU."""
    host = re.compile(r" (conditional|outfeed|infeed|send|recv|send-done|recv-done)\(|MoveToHost|S\(5\)")
    return [line.strip()[:120] for line in hlo_text.splitlines() if host.search(line)]


def no_sync():
    p0 = model(jnp.bfloat16)
    tx = lanton.lanton(0.02)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
                   donate_argnums=(0, 1))
    found = host_syncs(step.lower(p0, tx.init(p0), grads(p0, 0)).compile().as_text())
    if found:
        sys.exit(f"FAIL: the step has {len(found)} host transfer(s) or conditional(s): {found[:2]}")
    print("no conditional and no host transfer in the compiled step")


if __name__ == "__main__":
    assert jax.default_backend() == "gpu", "needs jax's CUDA backend"
    cmd, *args = sys.argv[1:]
    {"dump": dump, "compare": compare, "no-sync": no_sync}[cmd](*args)
