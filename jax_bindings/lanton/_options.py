"""The options of `lanton(...)`: the layer groups and the checks of what a user passes, by name.
Python's defaults live in `StepConfig` (_config.py) and here (`Group`, `KIND_SCALE`)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks
from ._config import LMO_KINDS
from .labels import SPLIT_GROUPS

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ScalarOrSchedule = optax.ScalarOrSchedule  # optax's own annotation: its generic checks read it


class Group(NamedTuple):
    """A layer group: one kind (an LMO geometry, or "adam"); optional per-group scale, weight
    decay and noise cadence.

    weight_decay=None takes the transformation's weight_decay for `hidden` and `embed` groups,
    0 for `vector` groups (norm gains and biases are not decayed) and `adam_weight_decay` for
    `adam` groups; scale=None is 1 for `adam` groups (NAdamW's step as optax takes it)."""

    kind: str
    scale: Optional[float] = None
    weight_decay: Optional[float] = None
    noise_every: Optional[int] = None


# `other`: how the leaves that are not hidden matrices (labels "embed" and "vector") step.
# "adam" (the default): NAdamW as optax.contrib.muon's Adam branch, the recipe that trained best
# (docs/decisions.md, issue 41); "lmo": the paper's geometry, Signum for embeddings and heads, RMS
# normalization for gains and biases.
OTHER_GROUPS = {
    "adam": {"hidden": Group("hidden"), "embed": Group("adam"), "vector": Group("adam")},
    "lmo": {k: Group(k) for k in LMO_KINDS},
}
DEFAULT_GROUPS = OTHER_GROUPS["adam"]
# A group without its own scale uses `scale` times its kind's factor: embeddings/heads (sign) and
# gains/biases (RMS) step at half the hidden matrices' RMS by default. Tuned on the Shakespeare
# GPT (benches/results/tuning/tune.md: 0.1 beat 0.2 and 0.4 at scale 0.2).
KIND_SCALE = {"hidden": 1.0, "embed": 0.5, "vector": 0.5}


def implicit_groups(other: str) -> dict:
    """Labels that work as groups without being declared: the kinds (embed and vector as
    `other` says), "adam", and the split hidden groups."""
    return {**OTHER_GROUPS[other], "adam": Group("adam"), **{g: Group("hidden") for g in SPLIT_GROUPS}}


def static(name, value, default, cast):
    """A structural option: a compile-time attribute of the custom call, never traced."""
    if value is None:
        return default
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"lanton option '{name}' is structural (compiled into the kernel) and cannot be traced; with "
            f"optax.inject_hyperparams pass static_args=('{name}',)"
        )
    return cast(value)


def flag(name):
    def cast(value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"lanton option '{name}' must be True or False, got {value!r}")
        return bool(value)
    return cast


def check_group(name, g):
    if not isinstance(g, Group):
        raise TypeError(f"group '{name}': expected lanton.Group(kind, ...), got {g!r}")
    what = f"Group '{name}' option"
    if g.scale is not None:
        _checks.real("scale", g.scale, lo=0.0, lo_open=True, what=what)
    if g.weight_decay is not None:
        _checks.real("weight_decay", g.weight_decay, lo=0.0, what=what)
    if g.noise_every is not None:
        _checks.positive_int("noise_every", g.noise_every, what=what)


def check_array(name, what, x):
    """A handled leaf must be a float array lanton supports (not a Python number or None)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(
            f"leaf '{name}': the {what} must be a JAX array of float32, bfloat16 or float16, got "
            f"{type(x).__name__} {x!r}; wrap it in jnp.asarray(...) or label it None"
        )
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"leaf '{name}': unsupported dtype {x.dtype} of the {what}; lanton handles float32, bfloat16 and float16")
