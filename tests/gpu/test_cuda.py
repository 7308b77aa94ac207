"""GPU test suite (run by tests/gpu/run.sh on a machine with jax's CUDA plugin; skipped elsewhere,
except under LANTON_REQUIRE_GPU=1, which run.sh sets: there a missing GPU fails every test).

The CUDA custom calls against lanton.reference (pure JAX, same device) and against the CPU
kernels, for every group kind, f32 and bf16, odd shapes and many leaves, over enough steps that
the noise tracker is refreshed (K = 2: G_prev stored on odd steps, used on even ones)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lanton

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu" and os.environ.get("LANTON_REQUIRE_GPU") != "1",
                                reason="needs jax's CUDA backend")


def model(dtype, key=0, many=1):
    ks = iter(jax.random.split(jax.random.key(key), 256))
    n = lambda *s: (0.1 * jax.random.normal(next(ks), s)).astype(dtype)
    p = {"wte": n(67, 24), "lm_head": n(24, 67), "ln_f": {"scale": 1 + n(24)}}
    for i in range(2 * many):
        p[f"block{i}"] = {"q": n(24, 24), "o": n(24, 24), "fc": n(24, 97), "proj": n(97, 24), "bias": n(97),
                          "odd": n(17, 33)}
    p["scanned"] = {"kernel": n(3, 24, 40), "norm": {"scale": 1 + n(3, 24)}}
    return p


def grads(params, step):
    leaves, tdef = jax.tree.flatten(params)
    ks = jax.random.split(jax.random.key(100 + step), len(leaves))
    return tdef.unflatten([jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(ks, leaves)])


def run(params, steps, device, **kw):
    tx = lanton.lanton(0.02, **{"weight_decay": 0.01, "noise_every": 2, **kw})
    params = jax.device_put(params, device)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    outs = []
    for t in range(steps):
        u, state = upd(jax.device_put(grads(params, t), device), state, params)
        outs.append(u)
        params = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, u)
    return outs, state


def close(a, b, rtol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-12)
    err = np.max(np.abs(a - b)) / scale
    assert err <= rtol, f"{what}: max error {err:.2e} of max |value| > {rtol:.0e}"


# rtol vs the CPU kernels (f32 everywhere); the reference on a GPU runs its f32 matmuls at XLA's
# default precision (TF32 on Hopper), so it gets at least 1e-2.
@pytest.mark.parametrize("dtype,ns_dtype,rtol", [(jnp.float32, "float32", 2e-3), (jnp.float32, "bfloat16", 6e-2),
                                                 (jnp.bfloat16, "bfloat16", 6e-2)])
def test_cuda_matches_reference_and_cpu(dtype, ns_dtype, rtol):
    params = model(dtype)
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    got, st = run(params, 5, gpu, backend="ffi", ns_dtype=ns_dtype)
    ref, st_ref = run(params, 5, gpu, backend="reference")
    # The CPU kernels' default estimator is the Gram eigenvalues; compare like with like.
    on_cpu, st_cpu = run(params, 5, cpu, backend="ffi", noise_estimator="polar")
    for t, (g, r, c) in enumerate(zip(got, ref, on_cpu)):
        for path, gl in jax.tree_util.tree_leaves_with_path(g):
            name = f"step {t + 1} {jax.tree_util.keystr(path)}"
            rl = _at(r, path)
            cl = _at(c, path)
            close(gl, rl, max(rtol, 1e-2), name + " vs reference")
            close(gl, cl, rtol, name + " vs CPU kernels")
    # The noise trackers and ratios agree (f32 everywhere; NS dtype only moves them slightly).
    for k, v in lanton.layer_stats(st).items():
        w = lanton.layer_stats(st_ref)[k]
        close(v["noise"], w["noise"], 2e-2, f"{k} noise H")
        close(v["ratio"], w["ratio"], 2e-2, f"{k} ratio r")
        assert np.all(np.asarray(v["noise"]) > 0), f"{k}: H never refreshed"


def test_staggered_schedule_matches_the_cpu_kernels():
    # K = 3 over 7 steps: each shape class's layers on their own phases (the phases argument),
    # the noise products gated per matrix on the GPU.
    params = model(jnp.float32)
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    kw = dict(backend="ffi", ns_dtype="float32", noise_every=3, noise_schedule="staggered")
    got, st = run(params, 7, gpu, **kw)
    on_cpu, st_cpu = run(params, 7, cpu, noise_estimator="polar", **kw)
    for t, (g, c) in enumerate(zip(got, on_cpu)):
        for path, gl in jax.tree_util.tree_leaves_with_path(g):
            close(gl, _at(c, path), 2e-3, f"step {t + 1} {jax.tree_util.keystr(path)} vs CPU kernels")
    stored = [np.asarray(x) for x in jax.tree.leaves(st.prev_step)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(stored, jax.tree.leaves(st_cpu.prev_step)))
    assert len({int(v) for a in stored for v in np.ravel(a)}) == 3, "the layers' phases all alike"


def _at(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", None))]
    return tree


def test_many_leaves_one_call_per_group():
    # 100 hidden matrices in 4 shape classes: several launches of MAX_LEAVES (24) per kernel.
    # The oracle is the CPU kernels (themselves checked against the reference above and in the
    # CPU suite): the pure-JAX reference unrolls every leaf, and at this size its compile alone
    # outlasted the 150 s this test had on the H200 (2026-12-04).
    params = model(jnp.float32, many=10)
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    got, st = run(params, 3, gpu, backend="ffi", ns_dtype="float32")
    on_cpu, st_cpu = run(params, 3, cpu, backend="ffi", noise_estimator="polar")
    assert len(jax.tree.leaves(params)) > 2 * 24
    for t, (g, c) in enumerate(zip(got, on_cpu)):
        for path, gl in jax.tree_util.tree_leaves_with_path(g):
            close(gl, _at(c, path), 2e-3, f"many leaves, step {t + 1} {jax.tree_util.keystr(path)}")
    for k, v in lanton.layer_stats(st).items():
        close(v["noise"], lanton.layer_stats(st_cpu)[k]["noise"], 2e-2, f"many leaves {k} noise H")


def test_in_place_path_matches_updates():
    params = model(jnp.float32)
    gpu = jax.devices("gpu")[0]
    p = jax.device_put(params, gpu)
    fused = lanton.fused(0.02, noise_every=2, ns_dtype="float32")
    tx = lanton.lanton(0.02, noise_every=2, ns_dtype="float32")
    q = jax.device_put(params, gpu)  # separate buffers: p is donated to the in-place step
    fs, ts = fused.init(p), tx.init(q)
    for t in range(4):
        g = jax.device_put(grads(params, t), gpu)
        p, fs = fused.step(g, fs, p)
        u, ts = jax.jit(tx.update)(g, ts, q)
        q = jax.tree.map(lambda a, b: a + b, q, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        close(a, b, 1e-5, "in place vs update")


def test_non_finite_gradient_skips_the_layer_on_gpu():
    params = model(jnp.float32)
    gpu = jax.devices("gpu")[0]
    tx = lanton.lanton(0.02, noise_every=1)
    p = jax.device_put(params, gpu)
    st = tx.init(p)
    g = grads(params, 0)
    g["block0"]["q"] = g["block0"]["q"].at[3, 4].set(jnp.nan)
    u, st2 = jax.jit(tx.update)(jax.device_put(g, gpu), st, p)
    assert np.all(np.asarray(u["block0"]["q"]) == 0)
    assert np.all(np.isfinite(np.asarray(st2.momentum["block0"]["q"])))
    assert np.any(np.asarray(u["block0"]["o"]) != 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_two_runs_of_the_same_steps_are_bitwise_equal_on_gpu(dtype):
    # Deterministic GPU results (issue 40): the kernels' reductions use no floating-point atomics
    # (fixed-order partial sums, lanton_sum_chunks), so the same steps from the same state give
    # the same bits, noise steps (K = 2) included; a large embedding spreads its layers over many
    # blocks, where atomics would add in the order the blocks happened to finish.
    params = {**model(dtype, many=2), "big": (0.1 * jax.random.normal(jax.random.key(7), (4096, 256))).astype(dtype)}
    gpu = jax.devices("gpu")[0]
    first, st1 = run(params, 5, gpu, backend="ffi")
    second, st2 = run(params, 5, gpu, backend="ffi")
    for a, b in zip(jax.tree.leaves((first, st1)), jax.tree.leaves((second, st2))):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), "two runs of the same steps differ"


def test_tf32_noise_products_match_the_reference(monkeypatch):
    # LANTON_NOISE_GEMM=tf32 (opt-in): the noise estimate's products on lanton_noise_gemm_tc
    # (mma.sync, TF32 operands). Its fragment layout is only emulated on the CPU (from the PTX
    # ISA); here it meets the hardware. TF32 moves H by ~1e-3 relative.
    params = model(jnp.float32)
    gpu = jax.devices("gpu")[0]
    monkeypatch.setenv("LANTON_NOISE_GEMM", "tf32")
    got, st = run(params, 5, gpu, backend="ffi", ns_dtype="float32")
    monkeypatch.delenv("LANTON_NOISE_GEMM")
    simt, st_simt = run(params, 5, gpu, backend="ffi", ns_dtype="float32")
    ref, st_ref = run(params, 5, gpu, backend="reference")
    ran_tf32 = False
    for k, v in lanton.layer_stats(st).items():
        w, s = lanton.layer_stats(st_ref)[k], lanton.layer_stats(st_simt)[k]
        close(v["noise"], w["noise"], 2e-2, f"{k} noise H (TF32) vs reference")
        close(v["noise"], s["noise"], 1e-2, f"{k} noise H (TF32) vs SIMT")
        close(v["ratio"], w["ratio"], 2e-2, f"{k} ratio r (TF32) vs reference")
        ran_tf32 |= k.startswith("block") and not np.array_equal(np.asarray(v["noise"]), np.asarray(s["noise"]))
    assert ran_tf32, "TF32 and SIMT noise estimates are bitwise equal: the tensor-core kernel did not run"
    for g, s in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(simt[-1])):
        close(g, s, 2e-3, "updates with TF32 noise products vs SIMT")
