"""The step's rules that the Python side forms itself, defined once here: the within-group rate
ratio (src/step/mod.rs `group_ratios` is the kernels' copy). The pure-JAX reference and the
multi-device split (`_mesh`, which forms the ratios from the all-gathered trackers) both call it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._config import default_ratio_cap

f32 = jnp.float32


def group_ratios(noise, valid, stat, eps, power=1.0, floor=0.0, cap=None):
    """r = min(cap, max(floor, (alpha / stat_{valid}(alpha))^power)), alpha = (H + eps)^(-1/2);
    1 where not valid. cap None: the statistic's (1 for "median", none for the others)."""
    alpha = jax.lax.rsqrt(noise + f32(eps))
    any_valid = jnp.any(valid)
    if stat == "max":
        ref = jnp.max(jnp.where(valid, alpha, -jnp.inf))
    elif stat == "min":
        ref = jnp.min(jnp.where(valid, alpha, jnp.inf))
    elif stat == "median":
        ref = jnp.nanmedian(jnp.where(valid, alpha, jnp.nan))
    else:
        ref = jnp.sum(jnp.where(valid, alpha, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    ok = valid & any_valid & jnp.isfinite(ref) & (ref > 0)
    r = alpha / jnp.where(ok, ref, 1.0)
    if power != 1.0:
        r = r ** f32(power)
    r = jnp.maximum(r, f32(floor))
    cap = default_ratio_cap(stat) if cap is None else cap
    if cap != math.inf:
        r = jnp.minimum(r, f32(cap))
    return jnp.where(ok, r, 1.0)
