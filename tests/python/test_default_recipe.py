"""Issue 41: the default is the recipe (lanton on the hidden matrices, NAdamW as optax.contrib.muon's
Adam branch on every other leaf, in lanton's own kernels), optax.contrib.muon's argument names, and
a state of the other recipe refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lanton

needs_kernels = pytest.mark.skipif(not lanton.kernels_available(), reason="liblanton not built")


def gpt_like(key, dtype=jnp.float32):
    """Embedding, head, two blocks of hidden matrices, biases and norm gains (random, not zeros)."""
    k = jax.random.split(key, 8)
    n = lambda i, shape, s=0.5: (s * jax.random.normal(k[i], shape)).astype(dtype)
    return {
        "wte": n(0, (40, 16)),
        "blocks": [{"attn": {"kernel": n(1 + b, (16, 48)), "bias": n(3 + b, (48,), 0.1)},
                    "ln": {"scale": (1 + n(5 + b, (16,), 0.1)).astype(dtype)}} for b in range(2)],
        "lm_head": n(7, (16, 40)),
    }


def grads_for(params, t, scale=1.0):
    key = jax.random.key(100 + t)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([(scale * jax.random.normal(kk, x.shape)).astype(x.dtype) for kk, x in zip(keys, leaves)])


def hidden_only(params):
    return jax.tree.map(lambda k: optax.contrib.MuonDimensionNumbers(0, 1) if k == "hidden" else None,
                        lanton.default_labels(params))


def run(tx, params, steps, nan_at=None):
    state, out = tx.init(params), []
    upd = jax.jit(tx.update)
    for t in range(steps):
        g = grads_for(params, t)
        if nan_at is not None and nan_at[0] == t:
            g = nan_at[1](g)
        u, state = upd(g, state, params)
        out.append(u)
        params = optax.apply_updates(params, u)
    return out, state, params


def non_hidden(tree, params):
    labels = jax.tree.leaves(lanton.default_labels(params))
    return [x for x, k in zip(jax.tree.leaves(tree), labels) if k != "hidden"]


@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_the_adam_part_steps_as_optax_contrib_muons_adam_branch(backend):
    if backend == "ffi" and not lanton.kernels_available():
        pytest.skip("liblanton not built")
    params = gpt_like(jax.random.key(0))
    ours, _, _ = run(lanton.lanton(0.0075, adam_weight_decay=0.1, backend=backend), params, 5)
    muon, _, _ = run(optax.contrib.muon(0.0075, adam_learning_rate=0.4 * 0.0075, adam_weight_decay=0.1,
                                        muon_weight_dimension_numbers=hidden_only), params, 5)
    for t, (a, b) in enumerate(zip(ours, muon)):
        for x, y in zip(non_hidden(a, params), non_hidden(b, params)):
            # f32: optax forms 1 - b2 in f64 from the Python float, the kernels in f32 (b2 is data): ~1e-5.
            x, y = np.asarray(x), np.asarray(y)
            assert np.abs(x - y).max() <= 3e-5 * np.abs(y).max(), f"step {t}"


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_fused_default_equals_the_multi_transform_hybrid_and_the_reference(dtype):
    """The recipe in one fused call per group == the recipe written as optax.multi_transform of
    lanton (hidden) and optax.adamw (the rest), within f32 round-off; the pure-JAX reference agrees
    at the dtype's tolerance. K = 2, so the hidden group's ratios move too."""
    params = gpt_like(jax.random.key(1), dtype)
    fused, state, _ = run(lanton.lanton(noise_every=2, backend="ffi"), params, 6)
    ref, _, _ = run(lanton.lanton(noise_every=2, backend="reference"), params, 6)

    def part(p):
        return jax.tree.map(lambda k: "lanton" if k == "hidden" else "adam", lanton.default_labels(p))

    hybrid = optax.multi_transform(
        {"lanton": lanton.lanton(noise_every=2, labels=lambda p: jax.tree.map(
            lambda k: k if k == "hidden" else None, lanton.default_labels(p))),
         "adam": optax.adamw(0.4 * 0.0075, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=True,
                             mu_dtype=jnp.float32)},
        part)
    hyb, _, _ = run(hybrid, params, 6)
    tol = 3e-5 if dtype == jnp.float32 else 2e-2
    for t in range(6):
        for x, y, z in zip(jax.tree.leaves(fused[t]), jax.tree.leaves(hyb[t]), jax.tree.leaves(ref[t])):
            x, y, z = (np.asarray(v, np.float32) for v in (x, y, z))
            scale = np.abs(y).max()
            if dtype == jnp.float32:
                assert np.abs(x - y).max() <= tol * scale, f"step {t}"
            assert np.abs(x - z).max() <= tol * scale, f"step {t} (reference)"
    ratios = {k: np.asarray(v["ratio"]) for k, v in lanton.layer_stats(state).items()}
    assert any((r < 1).any() for r in ratios.values()), ratios  # the hidden layers' ratios moved
    assert all((ratios[k] == 1).all() for k in ("wte", "lm_head", "blocks/0/ln/scale"))


@needs_kernels
def test_a_non_finite_gradient_skips_its_adam_leaf_and_is_counted():
    params = gpt_like(jax.random.key(2))

    def poison(g):
        g["wte"] = g["wte"].at[3, 4].set(jnp.nan)
        return g

    ups, state, _ = run(lanton.lanton(backend="ffi"), params, 4, nan_at=(2, poison))
    ref_ups, ref_state, _ = run(lanton.lanton(backend="reference"), params, 4, nan_at=(2, poison))
    assert not np.asarray(ups[2]["wte"]).any()  # zero update on that step
    assert all(np.isfinite(np.asarray(x)).all() for u in ups for x in jax.tree.leaves(u))
    assert np.isfinite(np.asarray(state.nu["wte"])).all() and np.isfinite(np.asarray(state.momentum["wte"])).all()
    assert int(lanton.layer_stats(state)["wte"]["skipped"]) == 1
    assert int(lanton.layer_stats(state)["lm_head"]["skipped"]) == 0
    assert int(lanton.layer_stats(ref_state)["wte"]["skipped"]) == 1  # the reference counts alike
    for a, b in zip(jax.tree.leaves(ups[3]), jax.tree.leaves(ref_ups[3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)


def test_an_adam_leaf_keeps_its_moments_and_skipped_count_only():
    # The Adam part tracks no noise: its leaves keep momentum, nu and the skipped count (3 arrays,
    # optax.adamw keeps 2), not the tracker's constants; layer_stats still reports them, at r = 1.
    params = gpt_like(jax.random.key(5))
    tx = lanton.lanton(noise_every=1)
    state = tx.init(params)
    kinds = {"wte": "adam", "lm_head": "adam", "blocks/0/ln/scale": "adam", "blocks/0/attn/kernel": "hidden"}
    for name, kind in kinds.items():
        path = name.split("/")
        held = {}
        for field in ("momentum", "prev_grad", "nu", "noise", "valid", "prev_step", "ratio", "skipped"):
            x = getattr(state, field)
            for k in path:
                x = x[int(k)] if isinstance(x, list) else x[k]
            held[field] = not isinstance(x, optax.MaskedNode)
        want = {"momentum", "nu", "skipped"} if kind == "adam" else \
            {"momentum", "prev_grad", "noise", "valid", "prev_step", "ratio", "skipped"}
        assert {f for f, h in held.items() if h} == want, (name, held)
    _, state, _ = run(tx, params, 3)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))  # the step keeps its shape
    stats = lanton.layer_stats(state)
    assert float(stats["wte"]["ratio"]) == 1.0 and float(stats["wte"]["noise"]) == 0.0
    assert int(stats["wte"]["skipped"]) == 0 and float(stats["blocks/0/attn/kernel"]["noise"]) > 0


def test_other_lmo_is_the_papers_geometry_for_every_leaf():
    params = gpt_like(jax.random.key(3))
    lmo = lanton.lanton(other="lmo", backend="reference")
    explicit = lanton.lanton(groups={k: lanton.Group(k) for k in ("hidden", "embed", "vector")}, backend="reference")
    a, sa, _ = run(lmo, params, 3)
    b, _, _ = run(explicit, params, 3)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert jax.tree.leaves(sa.nu) == []  # no Adam moments: every leaf keeps a G_prev
    d, sd, _ = run(lanton.lanton(backend="reference"), params, 3)
    assert jax.tree.leaves(sd.prev_grad) and len(jax.tree.leaves(sd.nu)) == 6  # wte, head, 2 biases, 2 gains
    assert not np.allclose(np.asarray(a[2]["wte"]), np.asarray(d[2]["wte"]))
    with pytest.raises(ValueError, match="'other' must be one of"):
        lanton.lanton(other="sgd")


def test_a_state_of_the_other_recipe_is_refused_naming_the_option():
    params = gpt_like(jax.random.key(4))
    g = grads_for(params, 0)
    old = lanton.lanton(other="lmo").init(params)  # the default until 2026-12-07
    with pytest.raises(ValueError, match=r"leaf '[\w/]+' \(group '\w+', kind 'adam'\).*LMO kind.*option 'other'.*other='lmo'"):
        lanton.lanton().update(g, old, params)
    new = lanton.lanton().init(params)
    with pytest.raises(ValueError, match=r"kind '\w+'\).*Adam part.*option 'other'.*other='adam'"):
        lanton.lanton(other="lmo").update(g, new, params)
    # A checkpoint written before the state had its `nu` field restores into LantonState with nu=None.
    legacy = old._replace(nu=None)
    with pytest.raises(ValueError, match="option 'other'"):
        lanton.lanton().update(g, legacy, params)
    lanton.lanton(other="lmo").update(g, legacy, params)  # ... and continues under the recipe it was made with


def muon_style_training(make):
    """A training script written for optax.contrib.muon: only the constructor varies."""
    key = jax.random.key(5)
    x = jax.random.normal(key, (64, 8))
    y = jnp.sin(x @ jax.random.normal(jax.random.key(6), (8, 4)))
    params = {"l1": {"w": 0.3 * jax.random.normal(jax.random.key(7), (8, 32)), "b": jnp.zeros(32)},
              "l2": {"w": 0.3 * jax.random.normal(jax.random.key(8), (32, 4)), "b": jnp.zeros(4)}}
    dims = {"l1": {"w": optax.contrib.MuonDimensionNumbers(0, 1), "b": None},
            "l2": {"w": optax.contrib.MuonDimensionNumbers(0, 1), "b": None}}
    tx = make(learning_rate=0.02, ns_coeffs=(3.4445, -4.775, 2.0315), ns_steps=5, beta=0.95, eps=1e-8,
              weight_decay=0.01, weight_decay_mask=None, mu_dtype=jnp.float32, nesterov=True, adaptive=False,
              preconditioning="frobenius", adam_b1=0.9, adam_b2=0.999, adam_eps_root=0.0, adam_weight_decay=0.0,
              adam_learning_rate=None, muon_weight_dimension_numbers=dims, consistent_rms=None)

    def loss(p):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        return jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2)

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    state, losses = tx.init(params), []
    for _ in range(60):
        params, state, l = step(params, state)
        losses.append(float(l))
    return losses, state


def test_a_muon_script_trains_with_the_constructor_name_swapped():
    muon, _ = muon_style_training(optax.contrib.muon)
    ours, state = muon_style_training(lanton.lanton)
    assert ours[-1] < 0.5 * ours[0] and np.isfinite(ours).all(), ours[::10]
    assert ours[-1] < 2 * muon[-1], (ours[-1], muon[-1])
    # muon_weight_dimension_numbers: the matrices are the hidden group, the biases the Adam part.
    assert set(lanton.layer_stats(state)) == {"l1/w", "l1/b", "l2/w", "l2/b"}
    assert len(jax.tree.leaves(state.nu)) == 2 and len(jax.tree.leaves(state.prev_grad)) == 2


def test_muon_names_map_onto_lantons_options():
    params = gpt_like(jax.random.key(9))
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, run(a, params, 2)[0], run(b, params, 2)[0])
    same(lanton.lanton(beta=0.9, mu_dtype="bfloat16", backend="reference"),
         lanton.lanton(beta1=0.9, momentum_dtype="bfloat16", backend="reference"))
    same(lanton.lanton(ns_coeffs=(3.0, -3.2, 1.2), ns_steps=3, consistent_rms=0.3, backend="reference"),
         lanton.lanton(ns_coeffs=[(3.0, -3.2, 1.2)] * 3, scale=0.3, backend="reference"))
    same(lanton.lanton(ns_coeffs="standard", backend="reference"), lanton.lanton(backend="reference"))
    # eps / adam_eps_root / adam_b* / adam_learning_rate reach the Adam part only.
    a = run(lanton.lanton(eps=1e-3, adam_b1=0.5, adam_learning_rate=0.01, backend="reference"), params, 2)[0]
    b = run(lanton.lanton(backend="reference"), params, 2)[0]
    assert not np.allclose(np.asarray(a[1]["wte"]), np.asarray(b[1]["wte"]))
    np.testing.assert_array_equal(np.asarray(a[1]["blocks"][0]["attn"]["kernel"]),
                                  np.asarray(b[1]["blocks"][0]["attn"]["kernel"]))
    # A leaf with no dimension numbers goes to the Adam part, whatever its default label.
    dims = jax.tree.map(lambda _: None, params)
    dims["blocks"][0]["attn"]["kernel"] = optax.contrib.MuonDimensionNumbers(0, 1)
    _, state, _ = run(lanton.lanton(muon_weight_dimension_numbers=dims, backend="reference"), params, 1)
    assert len(jax.tree.leaves(state.prev_grad)) == 1 and len(jax.tree.leaves(state.nu)) == 7


def test_what_lanton_cannot_honour_is_refused_by_name():
    for kw, needle in [
        (dict(adaptive=True), "adaptive=True"),
        (dict(preconditioning="spectral"), "preconditioning='spectral'"),
        (dict(beta=0.9, beta1=0.95), "either beta1 or optax.contrib.muon's 'beta'"),
        (dict(mu_dtype="bfloat16", momentum_dtype="float16"), "mu_dtype"),
        (dict(consistent_rms=0.2, scale=0.3), "consistent_rms"),
        (dict(ns_coeffs="nope"), "unknown preset 'nope'"),
        (dict(ns_coeffs=[(3.0, -3.2, 1.2)] * 2, ns_steps=3), "'ns_steps' \\(3\\) must match the 2 triples"),
        (dict(labels=lambda p: p, muon_weight_dimension_numbers={}), "muon_weight_dimension_numbers"),
        (dict(adam_b2=1.5), "'adam_b2' must be finite and in"),
        (dict(eps=-1.0), "'eps' must be finite and in"),
    ]:
        with pytest.raises((ValueError, TypeError), match=needle):
            lanton.lanton(**kw)


def test_weight_decay_mask_applies_per_group():
    params = gpt_like(jax.random.key(10))
    no_decay = lambda p: jax.tree.map(lambda _: False, p)
    a = run(lanton.lanton(weight_decay=0.5, weight_decay_mask=no_decay, backend="reference"), params, 2)[0]
    b = run(lanton.lanton(weight_decay=0.0, backend="reference"), params, 2)[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = run(lanton.lanton(weight_decay=0.5, weight_decay_mask=lambda p: jax.tree.map(lambda _: True, p),
                          backend="reference"), params, 2)[0]
    assert not np.allclose(np.asarray(c[1]["blocks"][0]["attn"]["kernel"]), np.asarray(b[1]["blocks"][0]["attn"]["kernel"]))
    mixed = jax.tree.map(lambda _: True, params)
    mixed["blocks"][1]["attn"]["kernel"] = False
    with pytest.raises(ValueError, match=r"weight_decay_mask.*group 'hidden'.*label the leaves"):
        run(lanton.lanton(weight_decay=0.5, weight_decay_mask=mixed, backend="reference"), params, 1)


def test_the_adam_rate_follows_the_learning_rate_schedule():
    """adam_learning_rate=None: 0.4 x learning_rate, step by step (a schedule too)."""
    params = gpt_like(jax.random.key(11))
    sched = optax.linear_schedule(0.01, 0.001, 4)
    a = run(lanton.lanton(sched, backend="reference"), params, 3)[0]
    b = run(lanton.lanton(sched, adam_learning_rate=lambda n: 0.4 * sched(n), backend="reference"), params, 3)[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)
