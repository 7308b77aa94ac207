"""The training-quality variants (issue 14): ratio shaping (ratio_power, ratio_floor), the
noise-to-signal measure (noise_relative) and Option II (an independent second gradient as the
noise reference), on the fused kernels and the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lanton
from models import random_grads, transformer_params

BACKENDS = ["reference"] + (["ffi"] if lanton.kernels_available() else [])


def grads_at(t, params):
    # Noise differs from layer to layer; the gradients do not depend on the parameters, so runs
    # with different ratio rules see the same noise.
    g = random_grads(jax.random.key(100 + t), params)
    return jax.tree.map(lambda a, b: a + 0.5 * b, g, random_grads(jax.random.key(7), params))


# These tests follow the noise of every LMO kind (embed and vector groups too): other="lmo" (the
# default steps those leaves by NAdamW, which tracks no noise; test_default_recipe.py).
LMO = dict(other="lmo")


def run(params, steps, backend, second=None, **kw):
    tx = lanton.lanton(learning_rate=0.05, backend=backend, **{**LMO, **kw})
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for t in range(steps):
        g = grads_at(t, params)
        extra = {} if second is None else {"second_grad": second(t, g)}
        u, state = upd(g, state, params, **extra)
        params = optax.apply_updates(params, u)
    return params, state


def ratios(state):
    return np.concatenate([np.ravel(r) for r in jax.tree.leaves(state.ratio)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shaped_ratio_is_max_of_floor_and_tempered_plain_ratio_and_default_is_sqrt(backend):
    params = transformer_params(jax.random.key(0))
    _, plain = run(params, 6, backend, noise_every=1, ratio_power=1.0)  # the paper's rule
    _, shaped = run(params, 6, backend, noise_every=1, ratio_power=0.5, ratio_floor=0.6)
    # Same gradients, so the same noise; only the rule differs.
    for a, b in zip(jax.tree.leaves(plain.noise), jax.tree.leaves(shaped.noise)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    rp, rs = ratios(plain), ratios(shaped)
    assert (rp < 0.6**2).any() and ((rp > 0.6**2) & (rp < 0.99)).any(), rp  # both sides of the floor
    np.testing.assert_allclose(rs, np.maximum(0.6, np.sqrt(rp)), rtol=2e-6)
    # The default ratio_power is 0.5 (benches/results/quality): the square root of the paper's rule.
    _, default = run(params, 6, backend, noise_every=1)
    assert (rp < 0.5).any(), rp  # the noise tracker spread the ratios, so the two rules differ
    np.testing.assert_allclose(ratios(default), np.sqrt(rp), rtol=2e-6)


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_shaped_ratio_kernels_match_reference():
    params = transformer_params(jax.random.key(1))
    kw = dict(noise_every=2, ratio_power=0.7, ratio_floor=0.1, weight_decay=0.05)
    pf, sf = run(params, 12, "ffi", **kw)
    pr, sr = run(params, 12, "reference", **kw)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ratios(sf), ratios(sr), rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_noise_is_the_noise_over_the_momentum_dual_norm(backend):
    params = transformer_params(jax.random.key(8))
    b1, b2, steps = 0.8, 0.9, 5
    _, st = run(params, steps, backend, noise_every=1, beta1=b1, beta2=b2, noise_relative=True)
    # By hand for the embedding (dual norm: entrywise l1) and a vector leaf (sqrt(n) * l2), with
    # B the momentum after the step's update.
    l1 = lambda x: np.abs(x).sum()
    l2n = lambda x: np.sqrt(x.size) * np.sqrt((x**2).sum())
    want, mom, prev = {"wte": 0.0, "ln": 0.0}, None, None
    for t in range(steps):
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads_at(t, params))
        mom = jax.tree.map(lambda a: (1 - b1) * a, g) if mom is None else jax.tree.map(lambda m, a: b1 * m + (1 - b1) * a, mom, g)
        if prev is not None:
            for key, norm, get in (("wte", l1, lambda x: x["wte"]), ("ln", l2n, lambda x: x["ln_f"]["scale"])):
                n = norm(get(g) - get(prev)) / norm(get(mom))
                want[key] = b2 * want[key] + (1 - b2) * n**2
        prev = g
    np.testing.assert_allclose(np.asarray(st.noise["wte"]).reshape(-1)[0], want["wte"], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(st.noise["ln_f"]["scale"]).reshape(-1)[0], want["ln"], rtol=1e-4)


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_relative_noise_kernels_match_reference_and_differ_from_absolute():
    params = transformer_params(jax.random.key(9))
    kw = dict(noise_every=2, noise_relative=True, weight_decay=0.05)
    pf, sf = run(params, 12, "ffi", **kw)
    pr, sr = run(params, 12, "reference", **kw)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(sf.noise), jax.tree.leaves(sr.noise)):
        np.testing.assert_allclose(a, b, rtol=2e-3)
    np.testing.assert_allclose(ratios(sf), ratios(sr), rtol=2e-3)
    _, absolute = run(params, 12, "ffi", noise_every=2, weight_decay=0.05)
    assert not np.allclose(ratios(absolute), ratios(sf), rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_noise_of_a_layer_without_signal_is_dropped(backend):
    # A leaf whose gradient is always 0 has B = 0: its ratio 0/0 is dropped (H and valid stay 0,
    # r = 1), and nothing else is disturbed.
    params = transformer_params(jax.random.key(10))
    tx = lanton.lanton(learning_rate=0.05, backend=backend, noise_every=1, noise_relative=True, **LMO)
    state, upd = tx.init(params), jax.jit(tx.update)
    for t in range(4):
        g = grads_at(t, params)
        g = {**g, "ln_f": {**g["ln_f"], "scale": jnp.zeros_like(g["ln_f"]["scale"])}}
        u, state = upd(g, state, params)
        params = optax.apply_updates(params, u)
    assert np.all(np.asarray(state.noise["ln_f"]["scale"]) == 0)
    assert np.all(np.asarray(state.valid["ln_f"]["scale"]) == 0)
    assert np.all(np.asarray(state.ratio["ln_f"]["scale"]) == 1)
    assert np.all(np.asarray(state.valid["wte"]) == 1)  # the others were tracked
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_noise_norm_that_would_overflow_the_tracker_is_dropped(backend):
    # A gradient jump of ~1e20 (finite in f32) gives a norm whose square is not: H must not turn
    # inf (it would pin the layer's rate at 0 for good); the refresh is dropped instead.
    params = transformer_params(jax.random.key(11))
    tx = lanton.lanton(learning_rate=0.05, backend=backend, noise_every=1, **LMO)
    state, upd = tx.init(params), jax.jit(tx.update)
    prev_noise = None
    for t in range(5):
        g = grads_at(t, params)
        if t == 2:
            g = {**g, "lm_head": g["lm_head"] * 1e20}
        _, state = upd(g, state, params)
        noise = np.asarray(state.noise["lm_head"])
        if t == 2:  # step 3's refresh was dropped
            np.testing.assert_array_equal(noise, prev_noise)
        prev_noise = noise
    assert np.all(np.isfinite(prev_noise)) and np.all(prev_noise > 0)


def perturbed(t, g, size=0.3):
    """An independent second gradient: g plus fresh noise of a known size."""
    return jax.tree.map(lambda a, b: a + size * b, g, random_grads(jax.random.key(5000 + t), g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_two_noise_is_the_distance_to_the_second_gradient(backend):
    params = transformer_params(jax.random.key(2))
    b2, steps = 0.9, 5
    _, st = run(params, steps, backend, second=perturbed, noise_every=1, beta2=b2)
    # By hand for the embedding (dual norm: entrywise l1) and a vector leaf (sqrt(n) * l2).
    want_wte = want_ln = 0.0
    for t in range(steps):
        g = grads_at(t, params)
        d = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), g, perturbed(t, g))
        if t + 1 >= 2:  # steps are 1-based; step 1 is never a noise step
            n_wte = np.abs(d["wte"]).sum()
            n_ln = np.sqrt(d["ln_f"]["scale"].size) * np.sqrt((d["ln_f"]["scale"] ** 2).sum())
            want_wte = b2 * want_wte + (1 - b2) * n_wte**2
            want_ln = b2 * want_ln + (1 - b2) * n_ln**2
    np.testing.assert_allclose(np.asarray(st.noise["wte"]).reshape(-1)[0], want_wte, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(st.noise["ln_f"]["scale"]).reshape(-1)[0], want_ln, rtol=1e-4)
    # No gradient is kept across steps: G_prev and its step stay as init() made them.
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(st.prev_grad))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(st.prev_step))


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_option_two_kernels_match_reference_and_differ_from_option_one():
    params = transformer_params(jax.random.key(3))
    pf, sf = run(params, 10, "ffi", second=perturbed, noise_every=2)
    pr, sr = run(params, 10, "reference", second=perturbed, noise_every=2)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ratios(sf), ratios(sr), rtol=2e-3)
    _, s1 = run(params, 10, "ffi", noise_every=2)
    assert not np.allclose(ratios(s1), ratios(sf), rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_two_identical_second_gradient_measures_no_noise(backend):
    params = transformer_params(jax.random.key(4))
    _, st = run(params, 4, backend, second=lambda t, g: g, noise_every=1)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(st.noise))
    assert np.all(ratios(st) == 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_two_non_finite_second_gradient_leaves_noise_alone(backend):
    params = transformer_params(jax.random.key(5))

    def bad_at_3(t, g):
        g2 = perturbed(t, g)
        return {**g2, "wte": g2["wte"].at[0, 0].set(jnp.nan if t == 2 else g2["wte"][0, 0])}

    _, good = run(params, 3, backend, second=perturbed, noise_every=1)
    p_bad, bad = run(params, 3, backend, second=bad_at_3, noise_every=1)
    _, two = run(params, 2, backend, second=perturbed, noise_every=1)
    assert np.all(np.isfinite(jax.tree.leaves(p_bad)[0]))
    # Step 3's noise refresh of wte is skipped (its value is step 2's); other leaves refresh.
    np.testing.assert_allclose(np.asarray(bad.noise["wte"]), np.asarray(two.noise["wte"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bad.noise["lm_head"]), np.asarray(good.noise["lm_head"]), rtol=1e-6)
    assert np.all(np.asarray(bad.skipped["wte"]) == 0)  # the step itself is not skipped


def test_bad_second_gradient_and_shaping_options_are_refused_by_name():
    params = transformer_params(jax.random.key(6))
    tx = lanton.lanton(backend="reference")
    state = tx.init(params)
    g = random_grads(jax.random.key(0), params)
    with pytest.raises(ValueError, match="second_grad do not match the parameters' structure"):
        tx.update(g, state, params, second_grad={"wte": g["wte"]})
    wrong = {**g, "lm_head": g["lm_head"][:, :3]}
    with pytest.raises(ValueError, match=r"leaf 'lm_head': second_grad shape \(32, 3\) != parameter shape \(32, 64\)"):
        tx.update(g, state, params, second_grad=wrong)
    with pytest.raises(TypeError, match="lanton option 'noise_relative' must be True or False, got 1"):
        lanton.lanton(noise_relative=1)
    for name, value in (("ratio_power", -1.0), ("ratio_floor", float("nan"))):
        with pytest.raises(ValueError, match=f"'{name}' must be finite and in \\[0, inf\\)"):
            lanton.lanton(**{name: value})


def quiet_proj(t, params):
    """grads_at with the first MLP's down-projection faded 1e-4x: a layer whose gradient dies."""
    g = grads_at(t, params)
    g["blocks"][0]["mlp"]["proj"] = 1e-4 * g["blocks"][0]["mlp"]["proj"]
    return g


def run_grads(params, steps, backend, grads, **kw):
    tx = lanton.lanton(learning_rate=0.05, backend=backend, noise_every=1, **{**LMO, **kw})
    state, upd = tx.init(params), jax.jit(tx.update)
    for t in range(steps):
        u, state = upd(grads(t, params), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("backend", BACKENDS)
def test_median_reference_caps_ratios_at_one_and_a_quiet_layer_sets_no_ones_rate(backend):
    params = transformer_params(jax.random.key(11))
    _, st = run_grads(params, 6, backend, quiet_proj, ratio_stat="median", ratio_power=0.5)
    # By hand, per group: r = min(1, (alpha / median alpha)^0.5), alpha = (H + eps)^(-1/2).
    groups = {}
    for kind, h, v, r in zip(jax.tree.leaves(lanton.default_labels(params)), jax.tree.leaves(st.noise),
                             jax.tree.leaves(st.valid), jax.tree.leaves(st.ratio)):
        groups.setdefault(kind, []).append((np.ravel(h), np.ravel(v) > 0.5, np.ravel(r)))
    hidden_r = None
    for kind, items in groups.items():
        h, v, r = (np.concatenate(x) for x in zip(*items))
        assert v.all(), kind
        alpha = 1 / np.sqrt(h.astype(np.float64) + 1e-30)
        np.testing.assert_allclose(r, np.minimum(1.0, np.sqrt(alpha / np.median(alpha))), rtol=1e-5, err_msg=kind)
        if kind == "hidden":
            hidden_r = r
    assert (hidden_r == 1).sum() >= hidden_r.size // 2 and (hidden_r < 0.99).any(), hidden_r
    # Under "max" the faded layer is the reference and throttles the rest of its group.
    _, st_max = run_grads(params, 6, backend, quiet_proj, ratio_stat="max", ratio_power=0.5)
    r_max = np.asarray(st_max.ratio["blocks"][1]["mlp"]["proj"]).ravel()[0]
    r_med = np.asarray(st.ratio["blocks"][1]["mlp"]["proj"]).ravel()[0]
    assert r_max < 0.1 < r_med, (r_max, r_med)


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_median_reference_kernels_match_reference():
    params = transformer_params(jax.random.key(12))
    kw = dict(ratio_stat="median", ratio_power=0.7, weight_decay=0.05)
    pf, sf = run_grads(params, 8, "ffi", quiet_proj, **kw)
    pr, sr = run_grads(params, 8, "reference", quiet_proj, **kw)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ratios(sf), ratios(sr), rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_cap_lifts_or_moves_the_median_rules_cap(backend):
    # ratio_cap=inf: r = (alpha / median alpha)^0.5 uncapped, so the quieter half steps faster
    # (the faded layer most of all); a cap of 1.5 stops every layer there. By hand, per group.
    params = transformer_params(jax.random.key(11))
    for cap in (float("inf"), 1.5):
        _, st = run_grads(params, 6, backend, quiet_proj, ratio_stat="median", ratio_power=0.5, ratio_cap=cap)
        groups = {}
        for kind, h, r in zip(jax.tree.leaves(lanton.default_labels(params)), jax.tree.leaves(st.noise),
                              jax.tree.leaves(st.ratio)):
            groups.setdefault(kind, []).append((np.ravel(h), np.ravel(r)))
        for kind, items in groups.items():
            h, r = (np.concatenate(x) for x in zip(*items))
            alpha = 1 / np.sqrt(h.astype(np.float64) + 1e-30)
            np.testing.assert_allclose(r, np.minimum(cap, np.sqrt(alpha / np.median(alpha))), rtol=1e-5,
                                       err_msg=f"{kind} cap {cap}")
        faded = np.asarray(st.ratio["blocks"][0]["mlp"]["proj"]).ravel()[0]
        assert faded == pytest.approx(cap, rel=1e-6) if cap < 10 else faded > 10, (cap, faded)


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_uncapped_median_kernels_match_reference():
    params = transformer_params(jax.random.key(12))
    kw = dict(ratio_stat="median", ratio_power=0.5, ratio_cap=float("inf"))
    pf, sf = run_grads(params, 8, "ffi", quiet_proj, **kw)
    pr, sr = run_grads(params, 8, "reference", quiet_proj, **kw)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pr)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ratios(sf), ratios(sr), rtol=2e-3)
    assert ratios(sf).max() > 1.0


def test_ratio_cap_is_checked_by_name():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="'ratio_cap' must be"):
            lanton.lanton(ratio_cap=bad)
    with pytest.raises(ValueError, match="'ratio_cap' must be > 0 and >= ratio_floor \\(0.5\\), got 0.25"):
        lanton.lanton(ratio_cap=0.25, ratio_floor=0.5)


def muon_adam_part():
    return optax.adamw(3e-3, b1=0.9, b2=0.999, weight_decay=0.0, nesterov=True)


def readme_hybrid(backend):
    """The README's recipe: lanton (median reference) on hidden matrices, AdamW on the rest."""
    kinds = lanton.default_labels
    part = lambda p: jax.tree.map(lambda k: "lanton" if k == "hidden" else "adamw", kinds(p))
    hidden_only = lambda p: jax.tree.map(lambda k: k if k == "hidden" else None, kinds(p))
    return optax.multi_transform(
        {"lanton": lanton.lanton(0.0075, ratio_stat="median", labels=hidden_only, noise_every=1, backend=backend),
         "adamw": muon_adam_part()},
        part)


@pytest.mark.skipif("ffi" not in BACKENDS, reason="liblanton not built")
def test_readme_hybrid_recipe_kernels_match_reference_and_adam_owns_the_rest():
    params = transformer_params(jax.random.key(13))
    out = {}
    for backend in ("ffi", "reference"):
        tx, p = readme_hybrid(backend), params
        state, upd = tx.init(p), jax.jit(tx.update)
        for t in range(6):
            u, state = upd(quiet_proj(t, p), state, p)
            p = optax.apply_updates(p, u)
        out[backend] = (p, state)
    for a, b in zip(jax.tree.leaves(out["ffi"][0]), jax.tree.leaves(out["reference"][0])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    # The non-hidden leaves moved exactly as AdamW alone moves them.
    adam, p = muon_adam_part(), params
    st = adam.init(p)
    for t in range(6):
        u, st = adam.update(quiet_proj(t, p), st, p)
        p = optax.apply_updates(p, u)
    kinds = jax.tree.leaves(lanton.default_labels(params))
    moved = 0
    for k, a, b, x0 in zip(kinds, jax.tree.leaves(out["ffi"][0]), jax.tree.leaves(p), jax.tree.leaves(params)):
        if k != "hidden":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
            moved += int(not np.allclose(a, x0))
    assert moved == sum(k != "hidden" for k in kinds)
    r = np.concatenate([np.ravel(v["ratio"]) for v in lanton.layer_stats(out["ffi"][1]).values()])
    assert r.max() <= 1.0 and (r == 1.0).sum() >= r.size // 2 and (r < 0.99).any(), r
