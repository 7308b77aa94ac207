"""Robustness (issue 10): every model layout labelled right, every bad argument refused by name,
masked / wrapped trees, skipped-step accounting. Each test is a regression test for a failure
seen on main."""


import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lanton
from lanton import _transform
from models import random_grads, train_nnx_lm, transformer_params


def _plan(tx_impl_kwargs, params):
    # The LMO kinds' layouts (other="lmo"; the default lays its adam leaves out as matrices or vectors).
    impl = _transform._make(0.02, 0.8, 0.9, 0.0, 0.2, {**_default_kw(), "other": "lmo", **tx_impl_kwargs})
    plan, _, _ = impl.plan(params)
    return {lf.name: lf for group in plan.values() for lf in group}


def _default_kw():
    import inspect

    return {k: p.default for k, p in inspect.signature(lanton.lanton).parameters.items() if p.kind is p.KEYWORD_ONLY}


# -- layouts ------------------------------------------------------------------------------------


class NnxAttentionLM(nnx.Module):
    def __init__(self, rngs, d=16, heads=4, vocab=64):
        self.wte = nnx.Embed(vocab, d, rngs=rngs)
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, idx):
        x = self.wte(idx)
        x = x + self.attn(self.ln(x), mask=nnx.make_causal_mask(idx))
        return self.lm_head(x)


def test_nnx_multi_head_attention_trains_with_the_same_plan_at_init_and_update():
    model = NnxAttentionLM(nnx.Rngs(0))
    wrapped = nnx.state(model, nnx.Param)  # Variables: paths end in `.value`
    bare = jax.tree.map(jnp.asarray, nnx.to_pure_dict(wrapped))  # plain arrays, no wrapper
    a, b = _plan({}, wrapped), _plan({}, bare)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].group, a[name].canonical, a[name].rows_are_input) == (b[name].group, b[name].canonical, b[name].rows_are_input), name
    # (heads, head_dim) biases are one vector each; q/k/v kernels (d, heads, head_dim) one matrix.
    assert a["attn/query/bias"].group == "vector" and a["attn/query/bias"].canonical == (1, 1, 16)
    assert a["attn/key/kernel"].group == "hidden" and a["attn/key/kernel"].canonical == (1, 16, 16)
    assert a["attn/out/kernel"].canonical == (1, 16, 16) and a["attn/out/kernel"].rows_are_input
    labels = {lanton.labels.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(lanton.default_labels(wrapped))[0]}
    assert labels["attn/value/bias"] == "vector" and labels["attn/value/kernel"] == "hidden"

    tx = optax.chain(optax.clip_by_global_norm(1.0), lanton.lanton(0.02, noise_every=2))
    losses, optimizer = train_nnx_lm(model, tx, 12, seq=12)
    assert losses[-1] < losses[0] - 0.1, losses
    stats = lanton.layer_stats(optimizer.opt_state)  # found inside the chain and the NNX wrapper
    assert "attn/query/kernel" in stats and float(stats["attn/query/kernel"]["noise"]) > 0


def _singular_values(m):
    return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)


def test_conv_kernels_are_one_matrix_per_kernel_in_both_layouts():
    # Equinox / PyTorch layout (out, in, kh, kw): out x (in*kh*kw).
    conv = eqx.nn.Conv2d(4, 8, kernel_size=3, key=jax.random.key(0))
    model = {"conv": conv, "proj": eqx.nn.Linear(8, 8, key=jax.random.key(1))}
    params = eqx.filter(model, eqx.is_array)
    plan = _plan({}, params)
    assert plan["conv/weight"].group == "hidden"
    assert plan["conv/weight"].canonical == (1, 8, 36) and not plan["conv/weight"].rows_are_input
    assert plan["conv/bias"].group == "vector" and plan["conv/bias"].canonical == (1, 1, 8)  # (8, 1, 1): one vector
    assert plan["proj/weight"].canonical == (1, 8, 8)
    # Flax layout (kh, kw, in, out): (kh*kw*in) x out.
    linen = nn.Sequential([nn.Conv(8, (3, 3)), nn.Dense(8)])
    fparams = linen.init(jax.random.key(0), jnp.zeros((1, 6, 6, 4)))
    fplan = _plan({}, fparams)
    k = fplan["params/layers_0/kernel"]
    assert k.group == "hidden" and k.canonical == (1, 36, 8) and k.rows_are_input
    # A rank-3 Flax kernel is a conv only when its module says so (else: scanned layers).
    conv1d = nn.Conv(8, (3,)).init(jax.random.key(0), jnp.zeros((1, 6, 4)))  # linen names it Conv_0 in a model
    cplan = _plan({}, {"params": {"Conv_0": conv1d["params"]}})
    assert cplan["params/Conv_0/kernel"].canonical == (1, 12, 8)
    assert _plan({}, {"stack": {"kernel": jnp.ones((3, 4, 8))}})["stack/kernel"].canonical == (3, 4, 8)
    # The update of a conv kernel is one orthogonalized matrix, not 9 taps of 4x8.
    g = random_grads(jax.random.key(2), params)
    tx = lanton.lanton(0.1)
    u, _ = tx.update(g, tx.init(params), params)
    sv = _singular_values(np.asarray(u["conv"].weight).reshape(8, 36))
    assert sv.min() > 0.5 * sv.max(), sv  # Newton-Schulz: all singular values near one value


def test_flax_linen_conv_override_with_dimspec():
    linen = nn.Conv(8, (3, 3))
    params = linen.init(jax.random.key(0), jnp.zeros((1, 6, 6, 4)))
    # Tap by tap, explicitly: window axes become batch axes.
    dims = jax.tree.map(lambda _: None, params)
    dims["params"]["kernel"] = lanton.DimSpec(reduction_axes=2, output_axes=3)
    plan = _plan({"dim_numbers": dims}, params)
    assert plan["params/kernel"].canonical == (9, 4, 8)


# -- hyperparameters ---------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(beta1=1.0), "beta1", r"\[0, 1\)"),
    (dict(beta1=1.5), "beta1", r"\[0, 1\)"),
    (dict(beta1=-1.0), "beta1", r"\[0, 1\)"),
    (dict(beta2=1.5), "beta2", r"\[0, 1\)"),
    (dict(beta2=-0.1), "beta2", r"\[0, 1\)"),
    (dict(beta2=float("nan")), "beta2", "finite"),
    (dict(learning_rate=float("nan")), "learning_rate", "finite"),
    (dict(learning_rate=float("inf")), "learning_rate", "finite"),
    (dict(learning_rate=-0.1), "learning_rate", r"\[0, inf\)"),
    (dict(weight_decay=-1.0), "weight_decay", r"\[0, inf\)"),
    (dict(scale=0.0), "scale", r"\(0, inf\)"),
    (dict(ns_coeffs=[(3.4, float("nan"), 2.0)]), "ns_coeffs", "finite"),
    (dict(ns_coeffs=[(3.4, 2.0)]), "ns_coeffs", "triples"),
    (dict(ns_coeffs=[]), "ns_coeffs", "non-empty"),
    (dict(noise_every=2.7), "noise_every", "integer >= 1"),
    (dict(noise_every=0), "noise_every", "integer >= 1"),
    (dict(noise_every=True), "noise_every", "integer >= 1"),
    (dict(ratio_eps=-1.0), "ratio_eps", r"\[0, inf\)"),
    (dict(ratio_eps=float("inf")), "ratio_eps", "finite"),
    (dict(noise_adaptive="no"), "noise_adaptive", "True or False"),
    (dict(groups={"hidden": lanton.Group("hidden", noise_every=0)}), "noise_every", "integer >= 1"),
    (dict(groups={"hidden": lanton.Group("hidden", scale=-1.0)}), "scale", r"\(0, inf\)"),
    (dict(groups={"hidden": lanton.Group("hidden", weight_decay=float("nan"))}), "weight_decay", "finite"),
    (dict(groups=[lanton.Group("hidden")]), "groups", "dict"),
    (dict(ratio_stat="p90"), "ratio_stat", "p90"),
]


@pytest.mark.parametrize("kwargs,option,allowed", BAD_OPTIONS, ids=[f"{o}={list(k.values())[0]!r}" for k, o, _ in BAD_OPTIONS])
def test_bad_hyperparameters_are_refused_at_construction_by_name(kwargs, option, allowed):
    with pytest.raises((ValueError, TypeError), match=rf"(?s){option}.*{allowed}|{allowed}.*{option}"):
        lanton.lanton(**kwargs)
    with pytest.raises((ValueError, TypeError), match=option):
        lanton.fused(**kwargs)


def test_good_edge_hyperparameters_are_accepted():
    lanton.lanton(learning_rate=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, noise_every=10.0, ratio_eps=0.0)
    lanton.lanton(learning_rate=optax.constant_schedule(0.1), beta1=np.float32(0.9), noise_every=np.int64(3))
    lanton.lanton(groups={"hidden": lanton.Group("hidden", noise_every=5, scale=0.1, weight_decay=0.0)})


def test_injected_hyperparameters_are_checked_when_concrete():
    params = transformer_params(jax.random.key(0))
    tx = optax.inject_hyperparams(lanton.lanton)(learning_rate=0.02, beta1=1.0)
    with pytest.raises(ValueError, match=r"beta1.*\[0, 1\)"):
        tx.init(params)


# -- errors that name the leaf ----------------------------------------------------------------


def test_python_float_leaf_is_named():
    params = {"w": jnp.ones((4, 4)), "temperature": 1.0}
    with pytest.raises(TypeError, match=r"leaf 'temperature': the parameter must be a JAX array .* got float 1.0"):
        lanton.lanton().init(params)
    # Labelled None, a float leaf is simply left alone.
    tx = lanton.lanton(labels={"w": "hidden", "temperature": None})
    s = tx.init(params)
    u, _ = tx.update({"w": jnp.ones((4, 4)), "temperature": 0.5}, s, params)
    assert u["temperature"] == 0.5
    with pytest.raises(TypeError, match=r"leaf 'w': the gradient must be a JAX array .* got float"):
        tx.update({"w": 0.5, "temperature": 0.5}, s, params)


def test_state_from_a_model_whose_shapes_changed_is_refused_by_leaf():
    small = {"w": jnp.ones((4, 2)), "b": jnp.ones((8,))}
    big = {"w": jnp.ones((4, 3)), "b": jnp.ones((8,))}
    tx = lanton.lanton()
    state = tx.init(small)
    with pytest.raises(ValueError, match=r"leaf 'w': optimizer state 'momentum' has shape \(4, 2\), expected \(4, 3\)"):
        tx.update(big, state, big)
    stacked = {"w": jnp.ones((3, 4, 4)), "b": jnp.ones((8,))}
    flat = {"w": jnp.ones((12, 4)), "b": jnp.ones((8,))}
    dims = {"w": lanton.DimSpec(0, 1), "b": None}
    with pytest.raises(ValueError, match=r"leaf 'w': optimizer state"):
        tx.update(flat, lanton.lanton(dim_numbers=dims).init(stacked), flat)
    other = {"w": jnp.ones((4, 2)), "c": jnp.ones((8,))}
    with pytest.raises(ValueError, match=r"state field 'momentum' does not match the parameters' structure"):
        tx.update(other, state, other)


def test_labels_changed_since_init_are_named():
    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}
    state = lanton.lanton(labels={"w": "hidden", "v": None}).init(params)
    with pytest.raises(ValueError, match=r"leaf 'v' \(group 'hidden'\) has no optimizer state"):
        lanton.lanton(labels={"w": "hidden", "v": "hidden"}).update(params, state, params)


# -- partitions --------------------------------------------------------------------------------


def test_multi_transform_with_an_explicit_labels_tree_matches_a_pass_through_run():
    params = transformer_params(jax.random.key(0))
    base = lanton.default_labels(params)
    part = jax.tree.map(lambda l: "lan" if l == "hidden" else "adam", base)
    hidden_only = jax.tree.map(lambda l: l if l == "hidden" else None, base)
    tx = optax.multi_transform({"lan": lanton.lanton(0.02, labels=hidden_only, noise_every=2), "adam": optax.adamw(1e-3)}, part)
    ref = optax.multi_transform({"lan": lanton.lanton(0.02, labels=lambda p: jax.tree.map(lambda _: "hidden", p),
                                                      noise_every=2), "adam": optax.adamw(1e-3)}, part)
    s, s_ref, p, p_ref = tx.init(params), ref.init(params), params, params
    step, step_ref = jax.jit(tx.update), jax.jit(ref.update)
    for i in range(4):
        g = random_grads(jax.random.key(i), params)
        u, s = step(g, s, p)
        u_ref, s_ref = step_ref(g, s_ref, p_ref)
        p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)
    stats = lanton.layer_stats(s)
    assert "blocks/0/attn/q" in stats and "wte" not in stats
    assert float(stats["blocks/0/attn/q"]["noise"]) > 0


def test_layer_stats_finds_the_state_inside_chains_and_injected_hyperparams():
    params = transformer_params(jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(lanton.lanton)(learning_rate=0.02))
    s = tx.init(params)
    _, s = tx.update(random_grads(jax.random.key(1), params), s, params)
    stats = lanton.layer_stats(s)
    assert stats.keys() == lanton.layer_stats(s[1].inner_state).keys()
    assert "skipped" in stats["wte"]
    with pytest.raises(ValueError, match="no LantonState"):
        lanton.layer_stats(optax.adam(1e-3).init(params))


# -- reference edge cases and skipped steps ----------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "ffi"])
def test_zero_size_leaves_give_zero_updates(backend):
    if backend == "ffi" and not lanton.kernels_available():
        pytest.skip("liblanton not built")
    params = {"w": jnp.ones((0, 4)), "e": jnp.zeros((3, 0)), "v": jnp.zeros((0,)), "h": jnp.ones((2, 0, 5)), "ok": jnp.ones((4, 4))}
    labels = {"w": "hidden", "e": "embed", "v": "vector", "h": "hidden", "ok": "hidden"}
    tx = lanton.lanton(labels=labels, backend=backend, noise_every=1)
    s = tx.init(params)
    for i in range(3):
        u, s = tx.update(jax.tree.map(lambda x: x + 1.0 + i, params), s, params)
    assert {k: v.shape for k, v in u.items()} == {k: v.shape for k, v in params.items()}
    stats = lanton.layer_stats(s)
    np.testing.assert_array_equal(stats["h"]["ratio"], [1.0, 1.0])
    np.testing.assert_array_equal(stats["h"]["valid"], [0.0, 0.0])
    assert float(stats["ok"]["valid"]) == 1.0


@pytest.mark.parametrize("backend", ["reference", "ffi"])
def test_skipped_steps_are_counted_per_layer(backend):
    if backend == "ffi" and not lanton.kernels_available():
        pytest.skip("liblanton not built")
    params = transformer_params(jax.random.key(0))
    tx = lanton.lanton(0.02, noise_every=2, backend=backend)
    s = tx.init(params)
    step = jax.jit(tx.update)
    injected = {"blocks/0/attn/q": 0, "scanned/kernel": np.zeros(3, int)}
    for i in range(6):
        g = random_grads(jax.random.key(i), params)
        if i in (1, 4):
            g["blocks"][0]["attn"]["q"] = g["blocks"][0]["attn"]["q"].at[0, 0].set(jnp.nan)
            injected["blocks/0/attn/q"] += 1
        if i == 3:
            g["scanned"]["kernel"] = g["scanned"]["kernel"].at[2, 0, 0].set(jnp.inf)
            injected["scanned/kernel"][2] += 1
        before = s
        _, s = step(g, s, params)
        if i == 3:  # the skipped layer's state is untouched, the others move
            np.testing.assert_array_equal(s.momentum["scanned"]["kernel"][2], before.momentum["scanned"]["kernel"][2])
            assert not np.array_equal(s.momentum["scanned"]["kernel"][1], before.momentum["scanned"]["kernel"][1])
    stats = lanton.layer_stats(s)
    assert int(stats["blocks/0/attn/q"]["skipped"]) == 2
    np.testing.assert_array_equal(stats["scanned/kernel"]["skipped"], injected["scanned/kernel"])
    assert int(stats["blocks/0/attn/k"]["skipped"]) == 0


def test_soak_short_run_is_flat_finite_and_counts_every_skip(tmp_path):
    """The short variant of benches/soak.py (the full 10,000-step run's figures are committed in
    benches/results/soak/): spikes and NaN/Inf injections on a bf16 model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benches" / "soak.py"
    env = dict(os.environ)
    root = str(Path(lanton.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), "--steps", "500", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "soak.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(result["checks"].values()), result["checks"]
    assert result["injected_total"] > 0 and result["skipped_total"] == result["injected_total"]


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5"])
def test_invalid_num_threads_is_refused_at_construction(value):
    """LANTON_NUM_THREADS is checked by the library itself (lanton_check_env), in a fresh
    process, so the pool of this one is not involved."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    code = "import lanton\ntry:\n    lanton.lanton()\nexcept ValueError as e:\n    print('ERR', e)\nlanton.lanton(backend='reference')\nprint('reference ok')\n"
    env = {**os.environ, "LANTON_NUM_THREADS": value}
    root = str(Path(lanton.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert f"ERR lanton: LANTON_NUM_THREADS=\"{value}\" is invalid" in out.stdout, out.stdout + out.stderr
    assert "1 to 1024" in out.stdout and "reference ok" in out.stdout
