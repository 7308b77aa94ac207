"""lanton under sharded `jax.jit`: trains a small parameter tree with parameters, gradients and
optimizer state laid out over a mesh, with and without lanton's work split (`mesh=`), and
compares parameters, state and `layer_stats` with the same steps on one device, and the
Newton-Schulz directions computed (`lanton._ffi.newton_schulz_runs`) with one device's. Run by test_multidevice.py in a fresh interpreter (XLA_FLAGS must
give the virtual CPU devices before jax starts):

    python multidevice.py CASES                     # one process, 8 virtual devices
    python multidevice.py CASES PROCESS_ID 2 PORT   # one of two processes joined by
                                                    # jax.distributed, 4 virtual devices each

CASES: comma-separated, from data, fsdp_in, fsdp_out, fsdp_explicit, layers, 2d, fused (lanton.fused
splits too; parameters on two meshes are refused), memory (the compiled per-device temporaries),
user_shard_map (lanton inside the user's own shard_map), bf16 (bf16 parameters and momentum, FSDP),
variants (other options, FSDP).
Prints one JSON line per case and mode: the case, the mesh, the largest differences and the leaf
shardings seen.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STEPS = 20
LAYERS = 8  # the stacked leaf's layer axis: one layer per device on the "layers" case


def params_and_grads(step):
    """The same tree in every process: embeddings, per-block matrices, a stacked (scanned)
    kernel, vectors, a torch-layout and a conv kernel. Gradients change every step so that
    G - G_prev != 0."""
    def n(key, *shape):
        return 0.1 * jax.random.normal(key, shape, jnp.float32)

    def tree(key):
        ks = iter(jax.random.split(key, 32))
        return {
            "wte": n(next(ks), 64, 32), "lm_head": n(next(ks), 32, 64),
            "blocks": [{"q": n(next(ks), 32, 32), "fc": n(next(ks), 32, 128), "proj": n(next(ks), 128, 32),
                        "ln": {"scale": 1 + n(next(ks), 32)}} for _ in range(2)],
            "scanned": {"kernel": n(next(ks), LAYERS, 32, 64), "norm": {"scale": 1 + n(next(ks), LAYERS, 32)}},
            "head_t": {"weight": n(next(ks), 64, 32)},  # torch layout (d_out, d_in): rows are outputs
            "Conv_0": {"kernel": n(next(ks), 3, 3, 16, 32)},  # (*window, in, out): three row axes
        }
    grads = [tree(jax.random.key(100 + t)) for t in range(step)]
    # A NaN in one row of an FSDP-cut matrix: one device's shard only. (One process: across
    # processes device_put checks that every process passes the same values, and NaN != NaN.)
    if step > 7 and jax.process_count() == 1:
        grads[7]["blocks"][1]["fc"] = grads[7]["blocks"][1]["fc"].at[3, 5].set(jnp.nan)
    return tree(jax.random.key(0)), grads


def lanton_state(s):
    import lanton
    if isinstance(s, lanton.LantonState):
        return s
    for c in s:
        found = lanton_state(c) if isinstance(c, tuple) else None
        if found is not None:
            return found
    return None


def spec_for(case, path, x):
    """The PartitionSpec of one leaf (and of its gradient and state buffers) for a case."""
    name = jax.tree_util.keystr(path)
    stacked = "scanned" in name
    if case == "data":
        return P()
    if case in ("fsdp_in", "fsdp_out", "fsdp_explicit"):
        if x.ndim == 2:
            return P(None, "x") if case == "fsdp_out" else P("x", None)
        if x.ndim == 3:
            return P(None, None, "x") if case == "fsdp_out" else P(None, "x", None)
        return P()
    if case == "layers":
        return P("x") if stacked else P()
    if case == "2d":
        if x.ndim == 2:
            return P("data", "model")
        if x.ndim == 3:
            return P(None, "data", "model")
        return P()
    raise ValueError(case)


def make_mesh(case):
    devices = np.array(jax.devices())
    if case == "2d":
        return Mesh(devices.reshape(2, 4), ("data", "model"))
    if case == "fsdp_explicit":  # arrays typed with their shardings (jax's explicit mode)
        return Mesh(devices, ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    return Mesh(devices, ("x",))


def state_shardings(state, param_shardings, mesh):
    """Momentum and previous gradient like their parameter; everything else replicated."""
    import lanton
    rep = NamedSharding(mesh, P())
    def per_field(field, value):
        if field in ("momentum", "prev_grad"):
            return jax.tree.map(lambda s, _: s, param_shardings, value)
        return jax.tree.map(lambda _: rep, value)
    def walk(s):
        if isinstance(s, lanton.LantonState):
            return lanton.LantonState(**{f: per_field(f, getattr(s, f)) for f in s._fields})
        if isinstance(s, tuple) and not hasattr(s, "_fields"):
            return tuple(walk(c) for c in s)
        if hasattr(s, "_fields"):
            return type(s)(*(walk(c) for c in s))
        return jax.tree.map(lambda _: rep, s)
    return walk(state)


def run(tx, params, grads, shard=None):
    """STEPS jitted update + apply_updates; with shard = (param_shardings, state_fn) the
    inputs and outputs are laid out over the mesh."""
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    if shard is None:
        f = jax.jit(step)
    else:
        ps, ss = shard
        state = jax.device_put(state, ss(state))
        params = jax.device_put(params, ps)
        f = jax.jit(step, in_shardings=(ps, ss(state), ps), out_shardings=(ps, ss(state)))
    for g in grads:
        if shard is not None:
            g = jax.device_put(g, shard[0])
        params, state = f(params, state, g)
    return jax.block_until_ready((params, state))  # all devices done before the counter is read


def to_host(tree):
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if not x.is_fully_addressable else np.asarray(x), tree)


def max_abs_diff(a, b):
    """The largest |a - b| over two trees of the same structure, in float64."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    cases = sys.argv[1].split(",")
    if len(sys.argv) > 2:
        pid, nproc, port = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    import lanton

    params, grads = params_and_grads(STEPS)
    # The stacked kernel's leading axis is a layer axis by default (3-D leaves).
    options = dict(learning_rate=0.02, noise_every=3, weight_decay=0.01)

    # Reference: one device, no sharding (each process computes it alone).
    with jax.default_device(jax.local_devices()[0]):
        before = lanton._ffi.newton_schulz_runs()
        want_p, want_s = run(lanton.lanton(**options), params, grads)
        want_p, want_s = jax.device_get((want_p, want_s))
        single_runs = lanton._ffi.newton_schulz_runs() - before

    for case in cases:
        if case == "fused":
            fused(options, params, grads, want_p, single_runs)
        elif case == "memory":
            memory(options)
        elif case == "variants":
            variants(params, grads)
        elif case == "bf16":
            bf16(options, params, grads)
        elif case == "user_shard_map":
            user_shard_map(options, params, grads, want_p, want_s)
        else:
            check(case, options, params, grads, want_p, want_s, single_runs)
    if len(sys.argv) > 2:
        jax.distributed.shutdown()


def check(case, options, params, grads, want_p, want_s, single_runs):
    """Sharded as the case says: every device repeating the step (mesh=False), lanton's work
    split over the mesh given (mesh=...) and over the inputs' own mesh (the default)."""
    import lanton
    mesh = make_mesh(case)
    ps = jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec_for(case, path, x)), params)
    shard = (ps, lambda s: state_shardings(s, ps, mesh))
    runs = {}
    modes = (("repeated", lanton.lanton(**options, mesh=False)), ("split", lanton.lanton(**options, mesh=mesh)),
             ("auto", lanton.lanton(**options)))  # the default: the mesh the inputs are laid out on
    for mode, tx in modes:
        before = lanton._ffi.newton_schulz_runs()
        got = run(tx, params, grads, shard=shard)
        runs[mode] = lanton._ffi.newton_schulz_runs() - before
        report(case, mode, got, want_p, want_s, single_runs, runs[mode])


def fused(options, params, grads, want_p, single_runs):
    """lanton.fused on FSDP-sharded inputs divides the work like lanton() (same result, each
    matrix orthogonalized once per step, no warning, parameters back in their layouts); inputs
    on two different meshes are refused by name."""
    import warnings

    import lanton
    mesh = make_mesh("fsdp_in")
    ps = jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec_for("fsdp_in", path, x)), params)
    opt = lanton.fused(**options)
    # Copies: the fused step donates them (device_put may share a buffer with its input).
    p, s = jax.device_put(jax.tree.map(jnp.copy, params), ps), opt.init(jax.tree.map(jnp.copy, params))
    before = lanton._ffi.newton_schulz_runs()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for g in grads:
            p, s = opt.step(jax.device_put(g, ps), s, p)
        jax.block_until_ready(p)
    runs = lanton._ffi.newton_schulz_runs() - before
    other = Mesh(np.array(jax.devices()).reshape(2, -1), ("a", "b"))
    tx = lanton.lanton(**options)
    try:
        g = jax.device_put(grads[0], NamedSharding(other, P()))
        jax.jit(tx.update)(g, tx.init(params), jax.device_put(params, ps))
        mixed = "no error"
    except ValueError as e:
        mixed = str(e)
    print(json.dumps({
        "case": "fused", "warnings": [str(w.message) for w in seen if "lanton" in str(w.message)],
        "fused_ns_runs": runs, "ns_runs_one_device": single_runs,
        "fused_params": float(max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                                  zip(jax.tree.leaves(to_host(p)), jax.tree.leaves(want_p)))),
        "layouts_kept": [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(p)
                         if x.sharding.spec != spec_for("fsdp_in", path, x)] == [],
        "mixed_meshes": mixed,
    }), flush=True)


def memory(options):
    """Per-device temporaries of the compiled FSDP step (XLA's memory analysis) for a tree of
    16 blocks and a 16-layer stacked leaf, with the work split over 8 and over 4 devices and
    repeated on 8, beside the parameters' size."""
    import lanton

    ks = iter(jax.random.split(jax.random.key(7), 64))
    n = lambda *shape: 0.1 * jax.random.normal(next(ks), shape, jnp.float32)
    params = {"blocks": [{"q": n(128, 128), "fc": n(128, 512), "ln": {"scale": 1 + n(128)}} for _ in range(16)],
              "scanned": {"kernel": n(16, 128, 256)}}
    temps = {}
    for name, devices, split in (("split_8", 8, True), ("split_4", 4, True), ("repeated_8", 8, False)):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("x",))
        ps = jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec_for("fsdp_in", path, x)), params)
        tx = lanton.lanton(**options, mesh=None if split else False)
        state = tx.init(params)
        ss = state_shardings(state, ps, mesh)

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step, in_shardings=(ps, ss, ps), out_shardings=(ps, ss), donate_argnums=(0, 1))
        # Laid out first, as a user's arrays are: the default follows the inputs' mesh.
        p, s = jax.device_put(params, ps), jax.device_put(state, ss)
        temps[name] = f.lower(p, s, p).compile().memory_analysis().temp_size_in_bytes
    print(json.dumps({"case": "memory", "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
                      "largest_matrix_bytes": 128 * 512 * 4, "temp_bytes": temps}), flush=True)


def variants(params, grads):
    """Other options, FSDP-sharded with the work split, against one device: Nesterov, noise
    relative to the signal, the mean statistic, the paper's power with a floor; the median
    statistic; the staggered noise schedule; Option II."""
    import lanton
    mesh = make_mesh("fsdp_in")
    ps = jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec_for("fsdp_in", path, x)), params)
    shard = (ps, lambda s: state_shardings(s, ps, mesh))
    opts = dict(learning_rate=0.02, noise_every=2, nesterov=True, noise_relative=True, ratio_stat="mean",
                ratio_power=1.0, ratio_floor=0.1)
    out = {"case": "variants"}

    def one_device_and_split(options):
        with jax.default_device(jax.local_devices()[0]):
            want = jax.device_get(run(lanton.lanton(**options), params, grads))
        got = to_host(run(lanton.lanton(**options), params, grads, shard=shard))
        return max_abs_diff(want, got), got

    out["options"], got = one_device_and_split(opts)
    # The median reference (r capped at 1), tempered.
    out["median"], got_m = one_device_and_split(dict(learning_rate=0.02, noise_every=2, ratio_stat="median", ratio_power=0.5))
    r_m = np.concatenate([np.ravel(v["ratio"]) for v in lanton.layer_stats(got_m[1]).values()])
    out["median_ratios_capped_and_vary"] = bool(r_m.max() <= 1.0 and np.ptp(r_m) > 1e-3)
    # The staggered noise schedule: each layer's phase travels with it to the device that owns it.
    out["staggered"], got_st = one_device_and_split(dict(learning_rate=0.02, noise_every=3, noise_schedule="staggered"))
    stored = np.concatenate([np.ravel(x) for x in jax.tree.leaves(lanton_state(got_st[1]).prev_step) if hasattr(x, "shape")])
    out["staggered_phases_vary"] = bool(len(set(stored[stored > 0].tolist())) == 3)  # (adam leaves store none: 0)
    # Option II: a second gradient per step (the next step's, as a stand-in).
    tx = lanton.lanton(learning_rate=0.02, noise_every=2)

    def option2(p, shard=None):
        s = tx.init(p)
        f = jax.jit(lambda p, s, g, g2: (lambda u, s: (optax.apply_updates(p, u), s))(
            *tx.update(g, s, p, second_grad=g2)))
        if shard is not None:
            p, s = jax.device_put(p, shard[0]), jax.device_put(s, shard[1](s))
        for g, g2 in zip(grads[:-1], grads[1:]):
            if shard is not None:
                g, g2 = jax.device_put(g, shard[0]), jax.device_put(g2, shard[0])
            p, s = f(p, s, g, g2)
        return p, s

    with jax.default_device(jax.local_devices()[0]):
        want2 = jax.device_get(option2(params))
    got2 = to_host(option2(params, shard))
    out["option2"] = max_abs_diff(want2, got2)
    out["ratios_vary"] = bool(np.ptp(np.concatenate([np.ravel(v["ratio"]) for v in lanton.layer_stats(got[1]).values()])) > 1e-3)
    print(json.dumps(out), flush=True)


def bf16(options, params, grads):
    """bf16 parameters and gradients, with f32 and with bf16 momentum, FSDP-sharded with the
    work split, against the same on one device: the largest difference in units of the
    parameters' bf16 spacing."""
    import lanton
    cast = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
    params, grads = cast(params), [cast(g) for g in grads]
    mesh = make_mesh("fsdp_in")
    ps = jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, spec_for("fsdp_in", path, x)), params)
    out = {"case": "bf16"}
    for momentum in ("float32", "bfloat16"):
        # The defaults (the median reference). The split forms delta in the kernels' order of f32
        # operations (step::Write); in another order one leaf came out 2 spacings apart after 20
        # steps (2026-12-06), in this one 0 under the median and the max reference.
        tx = lanton.lanton(**options, momentum_dtype=momentum)
        with jax.default_device(jax.local_devices()[0]):
            want = jax.device_get(run(tx, params, grads)[0])
        got = to_host(run(tx, params, grads, shard=(ps, lambda s: state_shardings(s, ps, mesh)))[0])
        spacing = lambda a: 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 2.0 ** -126))) - 7)  # bf16 ulp
        ulps = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / spacing(np.asarray(a, np.float64)))
                for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))]
        out[f"momentum_{momentum}_ulps"] = float(max(ulps))
        out[f"momentum_{momentum}_leaves_differing"] = int(sum(u > 0 for u in ulps))
    print(json.dumps(out), flush=True)


def user_shard_map(options, params, grads, want_p, want_s):
    """lanton inside the user's own shard_map over 8 devices: replicated parameters (each device
    steps the whole tree, as one device would); FSDP-sharded parameters refused by name (each
    device would orthogonalize its shard as a whole matrix); mesh=False lets each device step
    what it holds."""
    import lanton
    mesh = make_mesh("data")

    def steps(tx, specs):
        def train(p, gs):
            s = tx.init(p)  # inside: each device's state fits what it holds
            for g in gs:
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
            return (p, s) if specs == P() else p

        gs = grads if specs == P() else grads[:3]
        # (check_vma on, JAX's default: the types say which values vary across devices.)
        f = jax.jit(jax.shard_map(train, mesh=mesh, in_specs=(specs, [specs] * len(gs)),
                                  out_specs=(specs, P()) if specs == P() else specs))
        return jax.device_get(f(params, gs))

    got_p, got_s = steps(lanton.lanton(**options), P())
    fsdp = jax.tree_util.tree_map_with_path(lambda path, x: spec_for("fsdp_in", path, x), params)
    try:
        steps(lanton.lanton(**options), fsdp)
        sharded = "no error"
    except ValueError as e:
        sharded = str(e)
    try:
        steps(lanton.lanton(**options, mesh=False), fsdp)
        own = "ran"
    except Exception as e:  # noqa: BLE001 (reported, the test says what it expected)
        own = f"{type(e).__name__}: {e}"
    print(json.dumps({"case": "user_shard_map", "params": max_abs_diff(want_p, got_p), "state": max_abs_diff(want_s, got_s),
                      "sharded": sharded, "mesh_false": own}), flush=True)


def report(case, mode, got, want_p, want_s, single_runs, runs):
    import lanton
    got_p, got_s = got
    seen = {jax.tree_util.keystr(path): str(x.sharding.spec) for path, x in jax.tree_util.tree_leaves_with_path(got_p)}
    mom = jax.tree_util.tree_leaves_with_path(lanton_state(got_s).momentum)
    momentum_specs = {jax.tree_util.keystr(path): str(x.sharding.spec) for path, x in mom}
    got_p, got_s = to_host(got_p), to_host(got_s)

    stats_w, stats_g = lanton.layer_stats(want_s), lanton.layer_stats(got_s)
    print(json.dumps({
        "case": case, "mode": mode, "devices": jax.device_count(), "processes": jax.process_count(),
        # Newton-Schulz directions computed by this process's devices, and by one device alone.
        "ns_runs": runs, "ns_runs_one_device": single_runs,
        "params": max_abs_diff(want_p, got_p), "state": max_abs_diff(want_s, got_s), "layer_stats": max_abs_diff(stats_w, stats_g),
        "ratios_vary": bool(np.ptp(np.concatenate([np.ravel(v["ratio"]) for v in stats_g.values()])) > 1e-3),
        "param_specs": seen, "momentum_specs": momentum_specs,
    }), flush=True)


if __name__ == "__main__":
    main()
