"""lanton inside the JAX ecosystem: optax.chain, inject_hyperparams, scan, Flax NNX, Equinox,
the default labeller leaf by leaf, and checkpoint round trips."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import lanton
from models import random_grads, train_nnx_lm, transformer_params


def test_chain_with_clipping_under_jit_trains_a_regression():
    key = jax.random.key(0)
    w_true = jax.random.normal(key, (16, 8))
    x = jax.random.normal(jax.random.key(1), (256, 16))
    y = x @ w_true
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lanton.lanton(learning_rate=0.1, noise_every=1))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    first = None
    for _ in range(60):
        params, state, l = step(params, state)
        first = l if first is None else first
    assert float(l) < 0.1 * float(first)


def test_inject_hyperparams_schedule_changes_without_recompiling():
    params = transformer_params(jax.random.key(0))
    sched = optax.linear_schedule(0.05, 0.0, 10)
    tx = optax.inject_hyperparams(lanton.lanton)(learning_rate=sched, beta1=0.9)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)


    g = random_grads(jax.random.key(1), params)
    sizes = []
    for _ in range(4):
        u, state = step(g, state, params)
        sizes.append(float(jnp.abs(u["blocks"][0]["attn"]["q"]).mean()))
    assert len(traces) == 1
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] > 0
    # A constant (injected) learning rate can be changed in the state without recompiling.
    tx2 = optax.inject_hyperparams(lanton.lanton)(learning_rate=0.05)
    traces2 = []

    @jax.jit
    def step2(g, s, p):
        traces2.append(1)
        return tx2.update(g, s, p)

    state = tx2.init(params)
    u, state = step2(g, state, params)
    assert float(jnp.abs(u["blocks"][0]["attn"]["q"]).max()) > 0
    state.hyperparams["learning_rate"] = jnp.asarray(0.0, state.hyperparams["learning_rate"].dtype)
    u, state = step2(g, state, params)
    assert len(traces2) == 1
    assert float(jnp.abs(u["blocks"][0]["attn"]["q"]).max()) == 0.0


def test_scan_over_steps_matches_python_loop():
    params = transformer_params(jax.random.key(0))
    tx = lanton.lanton(0.02, noise_every=2)
    grads = [random_grads(jax.random.key(i), params) for i in range(4)]
    p, s = params, tx.init(params)
    for g in grads:
        u, s = jax.jit(tx.update)(g, s, p)
        p = optax.apply_updates(p, u)

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    (p2, s2), _ = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))((params, tx.init(params)), stacked)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class LinenGPT(nn.Module):
    @nn.compact
    def __call__(self, idx):
        x = nn.Embed(64, 32, name="wte")(idx) + self.param("wpe", nn.initializers.normal(0.02), (16, 32))[: idx.shape[-1]]
        for i in range(2):
            h = nn.LayerNorm(name=f"ln_{i}")(x)
            x = x + nn.Dense(32, name=f"attn_{i}")(h)
            x = x + nn.Dense(32, name=f"mlp_out_{i}")(nn.relu(nn.Dense(128, name=f"mlp_in_{i}")(h)))
        return nn.Dense(64, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def test_default_labels_flax_linen_leaf_by_leaf():
    params = LinenGPT().init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    labels = lanton.default_labels(params)["params"]
    assert labels["wte"]["embedding"] == "embed"
    assert labels["wpe"] == "embed"
    assert labels["lm_head"]["kernel"] == "embed"
    for i in range(2):
        assert labels[f"ln_{i}"] == {"scale": "vector", "bias": "vector"}
        for name in (f"attn_{i}", f"mlp_in_{i}", f"mlp_out_{i}"):
            assert labels[name] == {"kernel": "hidden", "bias": "vector"}
    assert labels["ln_f"] == {"scale": "vector", "bias": "vector"}


class EqxBlock(eqx.Module):
    ln: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln = eqx.nn.LayerNorm(32)
        self.attn = eqx.nn.MultiheadAttention(4, 32, key=k1)
        self.mlp_in = eqx.nn.Linear(32, 128, key=k2)
        self.mlp_out = eqx.nn.Linear(128, 32, key=k3)

    def __call__(self, x):
        h = jax.vmap(self.ln)(x)
        x = x + self.attn(h, h, h)
        return x + jax.vmap(self.mlp_out)(jax.nn.relu(jax.vmap(self.mlp_in)(h)))


class EqxGPT(eqx.Module):
    token_embedding: eqx.nn.Embedding
    blocks: list
    lm_head: eqx.nn.Linear

    def __init__(self, key):
        ks = jax.random.split(key, 4)
        self.token_embedding = eqx.nn.Embedding(64, 32, key=ks[0])
        self.blocks = [EqxBlock(ks[1]), EqxBlock(ks[2])]
        self.lm_head = eqx.nn.Linear(32, 64, use_bias=False, key=ks[3])

    def __call__(self, idx):
        x = jax.vmap(self.token_embedding)(idx)
        for b in self.blocks:
            x = b(x)
        return jax.vmap(self.lm_head)(x)


def test_default_labels_equinox_leaf_by_leaf_and_training():
    model = EqxGPT(jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    labels = lanton.default_labels(params)
    assert labels.token_embedding.weight == "embed"
    assert labels.lm_head.weight == "embed"
    for b in labels.blocks:
        assert (b.ln.weight, b.ln.bias) == ("vector", "vector")
        for lin in (b.attn.query_proj, b.attn.key_proj, b.attn.value_proj, b.attn.output_proj):
            assert lin.weight == "hidden"
        assert (b.mlp_in.weight, b.mlp_in.bias, b.mlp_out.weight, b.mlp_out.bias) == ("hidden", "vector", "hidden", "vector")
    # Equinox stores Linear weights (d_out, d_in): the default DimSpec says so.
    impl_plan = lanton._transform._Lanton(0.02, 0.95, 0.9, 0.0, 0.2, noise_every=1, noise_adaptive=True, nesterov=False,
                                          ratio_stat="max", ratio_eps=1e-30, ns_coeffs=None, labels=None, groups=None,
                                          dim_numbers=None, momentum_dtype=jnp.float32, backend="auto").plan(params)[0]
    mlp_in = [lf for lf in impl_plan["hidden"] if lf.name.endswith("blocks/0/mlp_in/weight")][0]
    assert mlp_in.rows_are_input is False and mlp_in.canonical == (1, 128, 32)

    tx = lanton.lanton(0.02, noise_every=1)
    opt_state = tx.init(params)
    idx = jax.random.randint(jax.random.key(1), (16,), 0, 64)

    @eqx.filter_jit
    def step(model, opt_state):
        def loss_fn(m):
            logits = m(idx[:-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, idx[1:]).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(15):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


class NnxGPT(nnx.Module):
    def __init__(self, rngs):
        self.wte = nnx.Embed(64, 32, rngs=rngs)
        self.ln = nnx.LayerNorm(32, rngs=rngs)
        self.fc = nnx.Linear(32, 128, rngs=rngs)
        self.proj = nnx.Linear(128, 32, rngs=rngs)
        self.lm_head = nnx.Linear(32, 64, use_bias=False, rngs=rngs)

    def __call__(self, idx):
        x = self.wte(idx)
        x = x + self.proj(nnx.relu(self.fc(self.ln(x))))
        return self.lm_head(x)


def test_flax_nnx_optimizer_and_labels():
    model = NnxGPT(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    labels = lanton.default_labels(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    by_prefix = lambda prefix: {v for k, v in flat.items() if k.startswith(prefix)}
    assert by_prefix("wte/embedding") == {"embed"}
    assert by_prefix("lm_head/kernel") == {"embed"}
    assert by_prefix("fc/kernel") == {"hidden"} and by_prefix("proj/kernel") == {"hidden"}
    assert by_prefix("fc/bias") == {"vector"} and by_prefix("ln/scale") == {"vector"}

    losses, _ = train_nnx_lm(model, lanton.lanton(0.02, noise_every=1), 15)
    assert losses[-1] < losses[0]


def test_default_labels_put_plain_labels_where_nnx_params_stood():
    """The labels of an NNX state hold no Param wrappers: the same tree fits the bare arrays
    nnx.Optimizer passes to update, and is a prefix of the wrapped state it passes to init."""
    model = NnxGPT(nnx.Rngs(0))
    wrapped = nnx.state(model, nnx.Param)
    labels = lanton.default_labels(wrapped)
    assert all(isinstance(x, str) for x in jax.tree.leaves(labels))
    assert jax.tree.structure(labels) == jax.tree.structure(nnx.as_pure(wrapped))
    assert not any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(labels, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    jax.tree.map(lambda label, sub: None, labels, wrapped)  # a prefix of the wrapped tree: no structure error


def test_partial_labels_and_dim_numbers_trees_mean_what_optax_muon_means():
    """A labels or dim_numbers tree may stop at a subtree, its entry standing for every leaf
    under it (optax.contrib.muon's dimension numbers and optax's masks work so): the same updates
    as the full trees; None for a subtree leaves all of it alone. Also when the tree matches by
    name (the parameters wrapped as NNX Params)."""
    k = iter(jax.random.split(jax.random.key(3), 8))
    n = lambda *s: jax.random.normal(next(k), s)
    params = {"w1": {"a": n(2, 6, 4), "b": n(2, 4, 6)}, "w2": {"c": n(5, 3), "d": n(3)}, "ln": n(4)}
    grads = jax.tree.map(lambda x: jnp.sin(3 * x) + 0.1, params)
    full = {"w1": {"a": "hidden", "b": "hidden"}, "w2": {"c": None, "d": None}, "ln": "vector"}
    partial = {"w1": "hidden", "w2": None, "ln": "vector"}
    whole = lanton.DimSpec((0, 1), 2)  # one matrix per leaf, where the default sees two stacked layers
    dims_full = {"w1": {"a": whole, "b": whole}, "w2": {"c": None, "d": None}, "ln": None}
    dims_partial = {"w1": whole, "w2": None, "ln": None}

    def step(labels, dims, p=params, g=grads):
        tx = lanton.lanton(0.05, labels=labels, dim_numbers=dims)
        return jax.jit(tx.update)(g, tx.init(p), p)[0]

    want = step(full, dims_full)
    for labels, dims in ((partial, dims_full), (full, dims_partial), (partial, dims_partial),
                         (lambda p: partial, lambda p: dims_partial)):
        jax.tree.map(np.testing.assert_array_equal, step(labels, dims), want)
    jax.tree.map(np.testing.assert_array_equal, want["w2"], grads["w2"])  # left alone: passed through
    # The spec took effect (one matrix differs from the default's two stacked layers).
    assert not np.allclose(want["w1"]["a"], step(full, None)["w1"]["a"])
    # By name: an entry for the subtree 'w1' holds for the leaves under it in a wrapped tree.
    wrapped = jax.tree.map(nnx.Param, params)
    got = step(partial, dims_partial, p=wrapped, g=jax.tree.map(nnx.Param, grads))
    jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(got), want)


def test_labels_held_in_an_equinox_module_are_a_tree_not_a_function():
    """An Equinox module is callable; a module whose fields are labels is still a labels tree."""
    model = EqxGPT(jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    labels = jax.tree.map(lambda k: k if k == "hidden" else None, lanton.default_labels(params))
    tx = lanton.lanton(0.02, labels=labels)
    state = tx.init(params)
    handled = set(lanton.layer_stats(state))
    assert handled and all(k == "hidden" for k in jax.tree.leaves(labels))
    assert handled == {name for name, kind in zip(
        [lanton.labels.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
        jax.tree.leaves(lanton.default_labels(params))) if kind == "hidden"}


def test_state_checkpoint_round_trip_bit_for_bit():
    params = transformer_params(jax.random.key(0))
    tx = lanton.lanton(0.02, noise_every=2)
    upd = jax.jit(tx.update)
    s = tx.init(params)
    p = params
    for i in range(3):
        u, s = upd(random_grads(jax.random.key(i), params), s, p)
        p = optax.apply_updates(p, u)
    blob = serialization.to_bytes((p, s))
    target = (params, tx.init(params))
    p2, s2 = serialization.from_bytes(target, blob)
    assert jax.tree.structure(s2) == jax.tree.structure(s)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Training continues identically from the restored state.
    for i in range(3, 6):
        g = random_grads(jax.random.key(i), params)
        u, s = upd(g, s, p)
        p = optax.apply_updates(p, u)
        u2, s2 = upd(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)


def test_layer_stats_reports_per_layer_noise_and_ratio():
    params = transformer_params(jax.random.key(0))
    tx = lanton.lanton(0.02, noise_every=1)
    s = tx.init(params)
    for i in range(3):
        _, s = jax.jit(tx.update)(random_grads(jax.random.key(i), params, scale=1 + i), s, params)
    stats = lanton.layer_stats(s)
    assert stats["scanned/kernel"]["noise"].shape == (3,)
    assert stats["blocks/0/attn/q"]["noise"].shape == ()
    assert float(stats["blocks/0/attn/q"]["noise"]) > 0
    ratios = [float(np.min(v["ratio"])) for v in stats.values()]
    assert min(ratios) < 1.0 and max(ratios) == 1.0


def test_unlabelled_leaves_pass_through_and_custom_groups():
    params = transformer_params(jax.random.key(0))
    base = lanton.default_labels(params)
    labels = jax.tree.map(lambda x: x, base)
    labels["wpe"] = None
    for b in labels["blocks"]:
        b["attn"].update(q="qk", k="qk", v="vo", o="vo")
    groups = {**lanton.DEFAULT_GROUPS, "qk": lanton.Group("hidden"), "vo": lanton.Group("hidden", scale=0.1)}
    tx = lanton.lanton(0.02, labels=labels, groups=groups, noise_every=1)
    s = tx.init(params)
    assert isinstance(s.momentum["wpe"], optax.MaskedNode)
    g = random_grads(jax.random.key(1), params)
    u, s = jax.jit(tx.update)(g, s, params)
    np.testing.assert_array_equal(u["wpe"], g["wpe"])


def test_embed_and_vector_groups_step_at_half_the_scale_by_default():
    # The LMO groups (other="lmo"; the default steps these leaves by NAdamW, test_default_recipe).
    params = transformer_params(jax.random.key(3))
    grads = random_grads(jax.random.key(4), params)
    tx = lanton.lanton(0.01, scale=0.2, other="lmo")
    u, _ = tx.update(grads, tx.init(params), params)
    # Step 1: r = 1 and no weight decay, so embed is lr * 0.1 * sign and vector has RMS lr * 0.1.
    np.testing.assert_allclose(np.abs(np.asarray(u["wte"])), 0.01 * 0.1, rtol=1e-6)
    rms = float(np.sqrt(np.mean(np.square(np.asarray(u["ln_f"]["scale"])))))
    assert abs(rms - 0.01 * 0.1) < 1e-6, rms
    # A group's own scale overrides the kind factor.
    tx = lanton.lanton(0.01, scale=0.2, other="lmo", groups={**lanton.DEFAULT_GROUPS, "embed": lanton.Group("embed", scale=0.3)})
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.abs(np.asarray(u["wte"])), 0.01 * 0.3, rtol=1e-6)


@pytest.mark.skipif(not lanton.kernels_available(), reason="liblanton not built")
def test_python_and_library_defaults_are_one_set():
    """One table of options per language, one set of defaults in all: the Python package's
    StepConfig equals the library's (what the XLA attributes and the C ABI's JSON keys default to)."""
    import ctypes
    import dataclasses
    import json

    lib = lanton.load_library()
    lib.lanton_default_config_json.restype = ctypes.c_char_p
    library = json.loads(lib.lanton_default_config_json())
    python = dataclasses.asdict(lanton.StepConfig(kind="hidden"))
    f32 = lambda x: float(np.float32(x))
    assert library.pop("kind") == python.pop("kind") == "hidden"
    assert [[f32(c) for c in t] for t in python.pop("ns_coeffs")] == library.pop("ns_coeffs")
    for k in ("ratio_eps", "ratio_power", "ratio_floor", "vector_eps", "adam_eps", "adam_eps_root"):
        assert f32(python.pop(k)) == f32(library.pop(k)), k
    # None in Python: the statistic's own cap, the library's number for the median.
    assert lanton.StepConfig(kind="hidden").resolved_ratio_cap() == library.pop("ratio_cap") == 1.0
    python.pop("ratio_cap")
    python.pop("ns_dtype")  # CUDA-only, an attribute of its own beside the step's options
    assert python == library


def test_the_paper_preset_is_the_papers_rule_over_lantons_other_defaults():
    params = transformer_params(jax.random.key(4))
    grads = [random_grads(jax.random.key(10 + t), params) for t in range(12)]

    def run(tx):
        state, p = tx.init(params), params
        upd = jax.jit(tx.update)
        for g in grads:
            u, state = upd(g, state, p)
            p = optax.apply_updates(p, u)
        return p, state

    got, _ = run(lanton.paper(noise_every=2))
    want, _ = run(lanton.lanton(0.03, ratio_stat="max", ratio_power=1.0, ratio_floor=0.0, noise_every=2,
                                noise_schedule="synchronous", other="lmo"))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # The paper's cadence by default, the staggered one on request.
    stag, _ = run(lanton.paper(noise_every=2, noise_schedule="staggered"))
    want, _ = run(lanton.lanton(0.03, ratio_stat="max", ratio_power=1.0, ratio_floor=0.0, noise_every=2,
                                noise_schedule="staggered", other="lmo"))
    jax.tree.map(np.testing.assert_array_equal, stag, want)
    # ... and not lanton's own rule at the same rate and cadence.
    ours, _ = run(lanton.lanton(0.03, noise_every=2))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ours)))
    with pytest.raises(TypeError, match=r"lanton.paper\(\) fixes \['ratio_power'\]"):
        lanton.paper(ratio_power=0.5)
