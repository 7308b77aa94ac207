"""LANTON in pure JAX: the test oracle for the fused kernels and the fallback where they cannot
run. Same calling convention as `lanton._ffi.group_step`; same math as src/step + src/cpu.

One step for the layers l of a group (Hao et al., arXiv 2510.14009; ../shared/ALGORITHM.md):

    B   = b1*B + (1-b1)*G
    H   = b2*H + (1-b2)*dual_norm(G - G_prev)^2       on noise steps (t % K == 0, t >= 2)
          (option noise_relative: dual_norm(G - G_prev) / dual_norm(B) in its place)
    r_l = alpha_l / stat_j alpha_j,  alpha = (H + eps)^(-1/2)  (valid layers; else 1)
    r_l = max(r_min, r_l^p), capped at 1 for stat = median       (StepConfig's defaults: median,
                                                                  p = 0.5, r_min = 0; the paper's: max, p = 1)
    X  <- X - lr*(wd*X + r_l*(s(shape)*D(B)))

The adam kind (optax.contrib.muon's Adam branch, NAdamW; src/step AdamRule): nu = b2*nu + (1-b2)*G^2
in the G_prev slot, D = NAdam's bias-corrected m / (sqrt(v + eps_root) + eps), r = 1, no noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._config import NUCLEAR_SCHEDULE, StepConfig
from ._plan import noise_phases
from ._rules import group_ratios

f32 = jnp.float32


def _oriented(x):
    """(L, R, C) -> (L, m, n) with m <= n, and whether it was transposed."""
    if x.shape[-2] > x.shape[-1]:
        return jnp.swapaxes(x, -1, -2), True
    return x, False


def _iterate(x, coeffs):
    for a, b, c in coeffs:
        A = x @ jnp.swapaxes(x, -1, -2)
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x


def _fro(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))


def newton_schulz(v, coeffs):
    """Polar-factor direction of each (R, C) matrix of v (L, R, C), in f32."""
    x, tr = _oriented(v.astype(f32))
    x = x / (_fro(x) + 1e-7)
    x = _iterate(x, coeffs)
    return jnp.swapaxes(x, -1, -2) if tr else x


# Gram eigenvalues under this fraction of the largest are f32 round-off (the CPU kernels' floor for
# their f32 Gram path, src/cpu/newton_schulz.rs; up to 256 rows they work in f64 without one).
GRAM_EIGEN_FLOOR = 1e-7


def nuclear_norm(d):
    """||D||_* = sum sqrt(eig(D D^T)) over the smaller side, for each matrix of d (L, R, C): what
    the CPU kernels estimate (f32 Gram matrix + symmetric eigenvalues here; ~1e-5 relative error,
    up to ~5e-4 on rank-1 inputs; the kernels: ~1e-6 up to 256 rows, the same above)."""
    x, _ = _oriented(d.astype(f32))
    fro = _fro(x)
    x0 = x / jnp.where(fro > 0, fro, 1.0)
    lam = jnp.linalg.eigvalsh(x0 @ jnp.swapaxes(x0, -1, -2))
    top = jnp.max(lam, axis=-1, keepdims=True)
    s = jnp.sum(jnp.where(lam > GRAM_EIGEN_FLOOR * top, jnp.sqrt(jnp.maximum(lam, 0.0)), 0.0), axis=-1)
    return fro[..., 0, 0] * s


def nuclear_norm_polar(d):
    """||D||_* = <D, polar(D)> for each matrix of d (L, R, C): the CUDA kernels' estimator
    (7 polar iterations, <= 1 % error; tensor-core products suit the GPU)."""
    x, _ = _oriented(d.astype(f32))
    fro = _fro(x)
    x0 = x / jnp.where(fro > 0, fro, 1.0)
    p = _iterate(x0, NUCLEAR_SCHEDULE)
    return fro[..., 0, 0] * jnp.sum(x0 * p, axis=(-2, -1))


def _nuclear_norm_for(estimator, d):
    """The estimator the config names; "auto": that of the platform's fused kernels."""
    if estimator == "eigen":
        return nuclear_norm(d)
    if estimator == "polar":
        return nuclear_norm_polar(d)
    return jax.lax.platform_dependent(d, cpu=nuclear_norm, default=nuclear_norm_polar)


def dual_norm(kind, d, rows_are_input, estimator="auto"):
    """Dual norm of each layer of d (L, R, C) for the group's kind."""
    r, c = d.shape[-2:]
    if r * c == 0:  # an empty layer has no noise (the kernels: n = 0, the layer stays invalid)
        return jnp.zeros(d.shape[0], f32)
    if kind == "hidden":
        d_in, d_out = (r, c) if rows_are_input else (c, r)
        return jnp.sqrt(d_out / d_in) * _nuclear_norm_for(estimator, d)
    if kind == "embed":
        return jnp.sum(jnp.abs(d), axis=(-2, -1))
    return jnp.sqrt(r * c) * jnp.sqrt(jnp.sum(jnp.square(d), axis=(-2, -1)))


def direction(config: StepConfig, v):
    if config.kind == "hidden":
        return newton_schulz(v, config.ns_coeffs)
    if config.kind == "embed":
        return jnp.sign(v)
    rms = jnp.sqrt(jnp.mean(jnp.square(v), axis=(-2, -1), keepdims=True))
    return v / (rms + config.vector_eps)


def bias_correction(decay, t):
    """1 - decay^t in f32 (as optax forms it; the kernels round it from f64: within an ulp)."""
    return 1.0 - jnp.power(jnp.asarray(decay, f32), jnp.asarray(t, f32))


def adam_direction(config: StepConfig, mu, nu, g, b1, b2, t):
    """NAdamW's direction from the new moments (optax.scale_by_adam; src/step AdamRule)."""
    bc1, bc2 = bias_correction(b1, t), bias_correction(b2, t)
    if config.nesterov:
        m = b1 * (mu / bias_correction(b1, t + 1)) + (1 - b1) * (g / bc1)
    else:
        m = mu / bc1
    return m / (jnp.sqrt(nu / bc2 + config.adam_eps_root) + config.adam_eps)


def update_scale(kind, scale, shape):
    if kind == "hidden":
        return scale * jnp.sqrt(f32(max(shape[-2], shape[-1])))
    return scale


def group_step(config: StepConfig, hyper, t, leaves, names=None, *, in_place: bool = False, phases=None,
               skipped=None):
    """Pure-JAX twin of the fused call; see lanton._ffi.group_step for the layout, `phases` and
    `skipped`."""
    del names
    if phases is None:
        phases = noise_phases(config.noise_schedule, config.noise_every, [lf[8] for lf in leaves])
    phases = jnp.asarray(phases, jnp.int32)
    canon, at = [], 0
    for lf in leaves:
        n = int(lf[8][0])
        canon.append(_canonical(lf, phases[at:at + n]))
        at += n
    runs = _merged(canon)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    merged = [tuple(cat([canon[i][k] for i in run]) for k in range(8)) + (canon[run[0]][8],) for run in runs]
    outs = [None] * len(leaves)
    for run, out in zip(runs, _group_step(config, hyper, t, merged, in_place)):
        at = 0
        for i in run:
            n = canon[i][0].shape[0]
            outs[i] = tuple(x[at:at + n] for x in out)
            at += n
    shapes = [(lf[0].shape, lf[4].shape) for lf in leaves]
    outs = [tuple(x.reshape(p_shape if k < 3 else l_shape) for k, x in enumerate(out)) for out, (p_shape, l_shape) in zip(outs, shapes)]
    if skipped is None:
        return [out[:7] for out in outs]
    # The kernels' count: one more step skipped where a layer's gradient was not finite.
    return [out[:7] + (count + (~out[7]).astype(jnp.int32),) for out, count in zip(outs, skipped)]


# Elements per merged batch of layers: bounds the copies that concatenation makes.
MERGE_CAP = 1 << 24


def _merged(leaves):
    """Runs of leaf indices traced as one batch of layers: the same (R, C), orientation and dtypes
    make the same per-layer program. XLA's compile time grows faster than the number of unrolled
    leaves (measured 2026-12-05 on CPU: one hidden group of 16 / 48 leaves 3.5 / 12 s, a 53-leaf
    model 31 s), and a transformer's leaves come in a few shapes. A run stops at MERGE_CAP
    elements; a larger leaf stays alone (no copy)."""
    runs, open_runs = [], {}
    for i, (param, grad, mom, prev, *_, rows_in) in enumerate(leaves):
        key = (param.shape[1:], rows_in, param.dtype, grad.dtype, mom.dtype, prev.dtype)
        run = open_runs.get(key)
        if run is None or sum(leaves[j][0].size for j in run) + param.size > MERGE_CAP:
            run = open_runs[key] = []
            runs.append(run)
        run.append(i)
    return runs


def _canonical(leaf, phases):
    """A leaf's arrays as (L, R, C) matrices and (L,) per-layer vectors, its layers' phases last."""
    param, grad, mom, prev, noise, valid, pstep, rows_in, dims = leaf
    mats = [x.reshape(dims) for x in (param, grad, mom, prev)]
    return (*mats, *(x.reshape(-1) for x in (noise, valid, pstep)), phases, rows_in)


def _group_step(config: StepConfig, hyper, t, leaves, in_place: bool):
    lr, b1, b2, wd, scale = (hyper[i] for i in range(5))
    k = int(config.noise_every)
    # src/step/mod.rs is_noise_step: t >= 2 and t = phase (mod K), per layer.
    due = lambda t, phase: config.noise_adaptive & (t >= 2) & ((t - phase) % k == 0)

    phase1 = []
    for param, grad, mom, prev, noise, valid, pstep, phase, rows_in in leaves:
        noise_step, keep = due(t, phase), due(t + 1, phase)
        g = grad.astype(f32)
        finite = jnp.all(jnp.isfinite(g), axis=(1, 2))
        fin3 = finite[:, None, None]
        b_new = jnp.where(fin3, b1 * mom.astype(f32) + (1 - b1) * g, mom.astype(f32)).astype(mom.dtype)
        usable = noise_step & finite & (pstep >= 1) & (pstep == t - 1)
        def measure(g=g, prev=prev, b=b_new, rows_in=rows_in):
            n = dual_norm(config.kind, g - prev.astype(f32), rows_in, config.noise_estimator)
            if config.noise_relative:  # noise-to-signal: inf or NaN (dropped below) where B = 0
                n = n / dual_norm(config.kind, b.astype(f32), rows_in, config.noise_estimator)
            return n

        n = jax.lax.cond(jnp.any(usable), measure, lambda g=g: jnp.zeros(g.shape[0], f32))
        tracked = b2 * noise + (1 - b2) * n * n
        upd = usable & jnp.isfinite(tracked)  # a norm that would make H non-finite is dropped
        noise_new = jnp.where(upd, tracked, noise)
        valid_new = jnp.where(upd & (n > 0), f32(1), valid)
        store = keep & finite
        prev_new = jnp.where(store[:, None, None], grad.astype(prev.dtype), prev)
        if config.kind == "adam":  # the G_prev slot holds the second moment nu
            nu = b2 * prev.astype(f32) + (1 - b2) * (g * g)
            prev_new = jnp.where(fin3, nu, prev.astype(f32)).astype(prev.dtype)
        pstep_new = jnp.where(store, t.astype(jnp.int32), pstep)
        phase1.append((b_new, prev_new, noise_new, valid_new, pstep_new, finite))

    all_noise = jnp.concatenate([p[2] for p in phase1])
    all_valid = jnp.concatenate([p[3] > 0.5 for p in phase1])
    if config.noise_adaptive:
        ratios = group_ratios(all_noise, all_valid, config.ratio_stat, config.ratio_eps, config.ratio_power,
                              config.ratio_floor, config.resolved_ratio_cap())
    else:
        ratios = jnp.ones_like(all_noise)

    outs, start = [], 0
    for (param, grad, mom, prev, noise, valid, pstep, _phase, rows_in), (b_new, prev_new, noise_new, valid_new, pstep_new, finite) in zip(
        leaves, phase1
    ):
        n_layers = param.shape[0]
        r = ratios[start:start + n_layers]
        start += n_layers
        v = b_new.astype(f32)
        if config.kind == "adam":
            d = adam_direction(config, v, prev_new.astype(f32), grad.astype(f32), b1, b2, t)
        else:
            if config.nesterov:
                v = b1 * v + (1 - b1) * grad.astype(f32)
            d = direction(config, v)
        x = param.astype(f32)
        s = update_scale(config.kind, scale, param.shape)
        delta = -lr * (wd * x + r[:, None, None] * (s * d))  # the kernels' order (step::Write)
        delta = jnp.where(finite[:, None, None], delta, 0.0)
        out = (x + delta) if in_place else delta
        if in_place:
            out = jnp.where(finite[:, None, None], out, x)
        outs.append((out.astype(param.dtype), b_new, prev_new, noise_new, valid_new, pstep_new, r, finite))
    return outs
