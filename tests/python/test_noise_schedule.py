"""The staggered noise schedule (issue 40): one phase map in Python and in the library, every
layer refreshed once per K steps with the gradient of the step before, the fused kernels equal
to the pure-JAX reference (a non-finite gradient on a due step included), and the option
checked by name."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lanton
from lanton import _ffi, _plan


def library_phases(schedule, every, dims):
    lib = _ffi.load_library()
    fn = lib.lanton_noise_phases
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32),
                   ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    flat = (ctypes.c_uint64 * (3 * len(dims)))(*[int(x) for d in dims for x in d])
    n = sum(int(d[0]) for d in dims)
    out = (ctypes.c_int32 * max(n, 1))()
    err = ctypes.create_string_buffer(256)
    config = f'{{"kind": "hidden", "noise_every": {every}, "noise_schedule": "{schedule}"}}'.encode()
    assert fn(config, flat, len(dims), out, n, err, len(err)) == 0, err.value
    return np.asarray(out[:n], np.int32)


def test_the_phase_map_is_the_librarys():
    rng = np.random.default_rng(3)
    for _ in range(20):
        dims = [(int(rng.integers(0, 5)), int(rng.choice([1, 4, 8])), int(rng.choice([4, 8]))) for _ in range(rng.integers(1, 9))]
        for schedule in ("synchronous", "staggered"):
            for every in (1, 3, 10):
                want = library_phases(schedule, every, dims)
                np.testing.assert_array_equal(_plan.noise_phases(schedule, every, dims), want, err_msg=f"{schedule} {every} {dims}")
    # Each class counts on across leaves: (8, 4) x 2, (4, 4), (8, 4) x 3 -> 0 1 | 0 | 2 0 1 for K = 3.
    np.testing.assert_array_equal(_plan.noise_phases("staggered", 3, [(2, 8, 4), (1, 4, 4), (3, 8, 4)]), [0, 1, 0, 2, 0, 1])


def _model(rng):
    n = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
    # Two (16, 8) classes' leaves, a (8, 8) one, an embedding and a vector.
    return {"a": n(3, 16, 8), "b": n(16, 8), "c": n(2, 8, 8), "wte": n(32, 8), "ln": {"scale": 1 + n(8)}}


LABELS = {"a": "hidden", "b": "hidden", "c": "hidden", "wte": "embed", "ln": {"scale": "vector"}}


def _run(backend, schedule, steps=9, every=3, nan_at=None, make=lanton.lanton):
    rng = np.random.default_rng(0)
    params = _model(rng)
    chosen = {} if schedule is None else {"noise_schedule": schedule}
    tx = make(0.02, noise_every=every, labels=LABELS, backend=backend, **chosen)
    state = tx.init(params)
    step = jax.jit(tx.update)
    history = []
    for t in range(1, steps + 1):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        if nan_at == t:  # layer 1 of "a" (phase 1 of K = 3: due on t = 4, 7)
            g["a"] = g["a"].at[1, 0, 0].set(jnp.nan)
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        history.append(jax.device_get(state))
    return params, history


@pytest.mark.parametrize("nan_at", [None, 7])
def test_fused_kernels_equal_the_reference_and_refresh_each_layer_once_per_k_steps(nan_at):
    p_ffi, h_ffi = _run("ffi", "staggered", nan_at=nan_at)
    p_ref, h_ref = _run("reference", "staggered", nan_at=nan_at)
    for a, b in zip(jax.tree.leaves(p_ffi), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for s_ffi, s_ref in zip(h_ffi, h_ref):
        for k in ("noise", "prev_step", "valid"):
            for a, b in zip(jax.tree.leaves(getattr(s_ffi, k)), jax.tree.leaves(getattr(s_ref, k))):
                np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=k)
    # The hidden layers in leaf order: a (3), b (1), c (2); phases 0 1 2 | 0 | 0 1 with K = 3.
    phases = _plan.noise_phases("staggered", 3, [(3, 16, 8), (1, 16, 8), (2, 8, 8)])
    np.testing.assert_array_equal(phases, [0, 1, 2, 0, 0, 1])
    noise = np.stack([np.concatenate([np.ravel(s.noise[k]) for k in ("a", "b", "c")]) for s in h_ffi])
    stored = np.stack([np.concatenate([np.ravel(s.prev_step[k]) for k in ("a", "b", "c")]) for s in h_ffi])
    for layer, phase in enumerate(phases):
        changed = [t for t in range(2, 10) if noise[t - 1, layer] != noise[t - 2, layer]]
        due = [t for t in range(2, 10) if (t - phase) % 3 == 0]
        # Refreshed on its own steps only, each one whose G_prev came from the step before.
        skipped = {7} if (nan_at == 7 and layer == 1) else set()
        assert changed == [t for t in due if t not in skipped], (layer, changed, due)
        for t in due:
            assert stored[t - 2, layer] == t - 1 or t - 1 == 0 or (t - 1) in skipped, (layer, t)
    # Every step measures some of the hidden layers and not others.
    assert all(0 < sum((t - p) % 3 == 0 for p in phases) < len(phases) for t in range(2, 10))


def _last_stored(history):
    # (adam leaves, the default's embeddings and vectors, keep no G_prev step at all)
    return {int(x) for s in jax.tree.leaves(history[-1].prev_step) for x in np.ravel(s)}


def test_staggered_is_the_default_and_the_paper_synchronous():
    p_default, h_default = _run("ffi", None)
    p_stag, _ = _run("ffi", "staggered")
    for a, b in zip(jax.tree.leaves(p_default), jax.tree.leaves(p_stag)):
        np.testing.assert_array_equal(a, b)
    # Staggered: the hidden layers (phases 0, 1, 2 with K = 3) stored G_prev last on steps 8, 9, 7.
    assert _last_stored(h_default) == {7, 8, 9}, _last_stored(h_default)
    # Synchronous (lanton.paper's, or asked for): every layer stored G_prev last on step 8.
    for make, schedule in ((lanton.paper, None), (lanton.lanton, "synchronous")):
        _, h_sync = _run("ffi", schedule, make=make)
        assert _last_stored(h_sync) == {8}, _last_stored(h_sync)


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="'noise_schedule' must be one of \\('synchronous', 'staggered'\\), got 'random'"):
        lanton.lanton(noise_schedule="random")
