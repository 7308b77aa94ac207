"""The step's rules that the Python side forms itself, defined once here: the within-group rate
ratio (src/step/mod.rs `group_ratios` is the kernels' copy). The pure-JAX reference and the
multi-device split (`_mesh`, which forms the ratios from the all-gathered trackers) both call it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

f32 = jnp.float32


def group_ratios(noise, valid, stat, eps, power, floor, cap):
    """r = min(cap, max(floor, (alpha / stat_{valid}(alpha))^power)), alpha = (H + eps)^(-1/2);
    1 where not valid. `cap`: `StepConfig.resolved_ratio_cap()` (math.inf: none)."""
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
    if cap != math.inf:
        r = jnp.minimum(r, f32(cap))
    return jnp.where(ok, r, 1.0)
