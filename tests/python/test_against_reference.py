"""The fused FFI path against lanton.reference over 20+ steps on a small transformer tree."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lanton
from models import random_grads, transformer_params

pytestmark = pytest.mark.skipif(not lanton.kernels_available(), reason="liblanton not built")


def run(backend, params, steps, **kw):
    tx = lanton.lanton(learning_rate=0.05, backend=backend, **kw)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for t in range(steps):
        # Fresh gradients with a shared component, so noise differs from layer to layer.
        g = random_grads(jax.random.key(100 + t), params)
        g = jax.tree.map(lambda a, b: a + 0.5 * b, g, random_grads(jax.random.key(7), params))
        u, state = upd(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


# The default (embeddings, head, gains and biases by NAdamW: other="adam"), and the LMO geometry
# for every leaf (other="lmo": Signum and RMS groups).
CASES = [(k, wd, a, "adam") for k, wd, a in itertools.product([1, 10], [0.0, 0.1], [True, False])] + [
    (1, 0.1, True, "lmo"), (10, 0.0, True, "lmo"), (1, 0.0, False, "lmo")]


@pytest.mark.parametrize("k,wd,adaptive,other", CASES)
def test_f32_matches_reference(k, wd, adaptive, other):
    params = transformer_params(jax.random.key(0))
    steps = 22
    kw = dict(noise_every=k, weight_decay=wd, noise_adaptive=adaptive, other=other)
    pf, sf = run("ffi", params, steps, **kw)
    pr, sr = run("reference", params, steps, **kw)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(sf.count, sr.count)
    for field in ("noise", "ratio"):
        for a, b in zip(jax.tree.leaves(getattr(sf, field)), jax.tree.leaves(getattr(sr, field))):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-30)
    for field in ("valid", "prev_step"):
        for a, b in zip(jax.tree.leaves(getattr(sf, field)), jax.tree.leaves(getattr(sr, field))):
            np.testing.assert_array_equal(a, b)
    ratios = np.concatenate([np.ravel(r) for r in jax.tree.leaves(sf.ratio)])
    if adaptive:
        assert (ratios < 0.999).any(), "noise adaptation never changed a ratio"
        # Every layer that tracks noise has measured some (adam leaves track none and keep no
        # tracker in the state: lanton._state.ADAM_FIELDS).
        kinds = jax.tree.leaves(lanton.default_labels(params))
        valid = jax.tree.leaves(sf.valid)
        assert len(valid) == sum(other == "lmo" or k == "hidden" for k in kinds)
        assert all(np.all(v == 1) for v in valid)
    else:
        assert np.all(ratios == 1.0)


def test_bf16_matches_reference_loosely():
    params = transformer_params(jax.random.key(1), dtype=jnp.bfloat16)
    pf, sf = run("ffi", params, 20, noise_every=1, weight_decay=0.1)
    pr, sr = run("reference", params, 20, noise_every=1, weight_decay=0.1)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # bf16 rounding compounds over 20 steps, and a near-zero momentum entry of a sign (embed)
        # leaf may flip under different rounding: allow one such step, lr * scale = 0.01.
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1.2e-2)
        assert np.mean(np.abs(a - b) > 2e-3) < 0.01
    for a, b in zip(jax.tree.leaves(sf.ratio), jax.tree.leaves(sr.ratio)):
        np.testing.assert_allclose(a, b, rtol=3e-2)


def test_inplace_fused_path_equals_update_path():
    params = transformer_params(jax.random.key(2))
    ref_params, ref_state = run("ffi", params, 5, noise_every=2, weight_decay=0.05)
    fz = lanton.fused(learning_rate=0.05, noise_every=2, weight_decay=0.05)
    p = jax.tree.map(jnp.copy, params)
    s = fz.init(p)
    for t in range(5):
        g = random_grads(jax.random.key(100 + t), params)
        g = jax.tree.map(lambda a, b: a + 0.5 * b, g, random_grads(jax.random.key(7), params))
        p, s = fz.step(g, s, p)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("estimator,bar", [("nuclear_norm", 5e-3), ("nuclear_norm_polar", 1e-2)])
def test_nuclear_norm_accuracy_against_numpy_svd(estimator, bar):
    est = getattr(lanton.reference, estimator)
    rng = np.random.default_rng(0)
    for shape in [(1, 40), (40, 1), (48, 48), (64, 200), (200, 64)]:
        low = rng.normal(size=(shape[0], 3)) @ rng.normal(size=(3, shape[1]))
        d = (low + 0.3 * rng.normal(size=shape)).astype(np.float32)
        want = np.linalg.svd(d.astype(np.float64), compute_uv=False).sum()
        got = float(est(jnp.asarray(d)[None])[0])
        assert abs(got - want) / want < bar, (shape, got, want)
        # Power-law and rank-1 spectra: slowly converging small singular values, an exact zero floor.
        k = min(shape)
        u = np.linalg.qr(rng.normal(size=(shape[0], k)))[0]
        v = np.linalg.qr(rng.normal(size=(shape[1], k)))[0]
        for s in (1.0 / (1.0 + np.arange(k)), np.eye(k)[0] * 2.0):
            got = float(est(jnp.asarray(((u * s) @ v.T).astype(np.float32))[None])[0])
            assert abs(got - s.sum()) / s.sum() < bar, (shape, got, s.sum())
    assert float(est(jnp.zeros((1, 3, 4)))[0]) == 0.0


def test_non_finite_gradients_do_not_corrupt_state():
    params = transformer_params(jax.random.key(3))
    tx = lanton.lanton(0.05, noise_every=1)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    u, state = upd(random_grads(jax.random.key(1), params), state, params)
    g = random_grads(jax.random.key(2), params)
    g["blocks"][0]["attn"]["q"] = g["blocks"][0]["attn"]["q"].at[0, 0].set(jnp.nan)
    g["scanned"]["kernel"] = g["scanned"]["kernel"].at[1, 0, 0].set(jnp.inf)
    u2, state2 = upd(g, state, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state2))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u2))
    np.testing.assert_array_equal(u2["blocks"][0]["attn"]["q"], 0.0)
    np.testing.assert_array_equal(state2.momentum["blocks"][0]["attn"]["q"], state.momentum["blocks"][0]["attn"]["q"])
    # Only the bad layer of the scanned stack is skipped.
    np.testing.assert_array_equal(u2["scanned"]["kernel"][1], 0.0)
    assert np.abs(u2["scanned"]["kernel"][0]).sum() > 0


def test_bf16_momentum_matches_reference():
    params = transformer_params(jax.random.key(4))
    pf, sf = run("ffi", params, 6, noise_every=2, momentum_dtype="bfloat16")
    pr, sr = run("reference", params, 6, noise_every=2, momentum_dtype="bfloat16")
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(sf.momentum))
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("estimator", ["eigen", "polar"])
def test_noise_estimators_match_the_reference(estimator):
    """Each estimator of the CPU kernels against the reference's twin, with the noise tracker
    refreshed every step (the estimator decides H and hence r)."""
    params = transformer_params(jax.random.key(0))
    pf, sf = run("ffi", params, 8, noise_every=1, noise_estimator=estimator)
    pr, sr = run("reference", params, 8, noise_every=1, noise_estimator=estimator)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(sf.noise), jax.tree.leaves(sr.noise)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-30)
    with pytest.raises(ValueError, match="noise_estimator"):
        lanton.lanton(noise_estimator="svd")


def test_reference_merges_same_shape_leaves_without_changing_a_step(monkeypatch):
    # The reference traces leaves of one (R, C), orientation and dtypes as one batch of layers
    # (its compile time grows faster than the leaf count). Merged, capped, or one leaf at a time,
    # a noise step's results are the same: every layer's math is its own, and the group's ratio
    # reference (max / median) does not depend on the order of the layers.
    from lanton import reference
    from lanton._config import StepConfig

    shapes = [(2, 8, 12, True, jnp.float32), (1, 8, 12, True, jnp.float32), (3, 12, 8, True, jnp.float32),
              (1, 8, 12, False, jnp.float32), (2, 8, 12, True, jnp.bfloat16), (1, 8, 12, True, jnp.float32),
              (1, 5, 7, True, jnp.float32)]
    ks = iter(jax.random.split(jax.random.key(3), 8 * len(shapes)))
    leaves = []
    for i, (n, r, c, rows_in, dt) in enumerate(shapes):
        x = lambda s=1.0: (s * jax.random.normal(next(ks), (n, r, c))).astype(dt)
        noise = jax.random.uniform(next(ks), (n,), minval=0.5, maxval=50.0)
        leaves.append((x(), x(), x(0.3), x(), noise, jnp.ones(n), jnp.full(n, 9, jnp.int32), rows_in, (n, r, c)))
    canonical = lambda lf: reference._canonical(lf, jnp.zeros(lf[8][0], jnp.int32))
    runs = reference._merged([canonical(lf) for lf in leaves])
    assert sorted(map(sorted, runs)) == [[0, 1, 5], [2], [3], [4], [6]]
    hyper = jnp.array([0.05, 0.8, 0.9, 0.1, 0.2], jnp.float32)
    # (The staggered schedule: merged runs keep every layer's own phase; t = 10 measures phase 0.)
    for stat, schedule in (("max", "synchronous"), ("median", "staggered")):
        config = StepConfig(kind="hidden", noise_every=10, ratio_stat=stat, noise_estimator="eigen", noise_schedule=schedule)
        merged = reference.group_step(config, hyper, jnp.int32(10), leaves)
        monkeypatch.setattr(reference, "MERGE_CAP", 2 * 8 * 12 + 1)  # splits run [0, 1, 5] after leaf 0
        assert sorted(map(sorted, reference._merged([canonical(lf) for lf in leaves])))[0] == [0]
        capped = reference.group_step(config, hyper, jnp.int32(10), leaves)
        monkeypatch.setattr(reference, "MERGE_CAP", 0)  # one leaf per run
        alone = reference.group_step(config, hyper, jnp.int32(10), leaves)
        monkeypatch.undo()
        for i, outs in enumerate(zip(merged, capped, alone)):
            for k, (x, y, z) in enumerate(zip(*outs)):
                assert x.shape == z.shape and x.dtype == z.dtype, (i, k)
                np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(z, np.float64), rtol=1e-6, atol=1e-7,
                                           err_msg=f"{stat}: leaf {i} output {k}, merged vs alone")
                np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(z, np.float64), rtol=1e-6, atol=1e-7,
                                           err_msg=f"{stat}: leaf {i} output {k}, capped vs alone")
        ratios = np.concatenate([np.asarray(a[6]) for a in alone])
        assert ratios.min() < 0.95 and np.any(ratios == 1.0), ratios  # the step did adapt the rates
