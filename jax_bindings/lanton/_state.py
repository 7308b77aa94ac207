"""lanton's optimizer state: its fields, how `init` makes it, how `update` reads it back (refusing,
by leaf, a state made for other parameters), and `layer_stats` for logging."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._plan import _is_masked
from .labels import path_str


class LantonState(NamedTuple):
    """Per leaf (a MaskedNode for leaves no group handles): momentum and previous gradient in
    the leaf's shape; noise H, validity, step of the stored gradient, last ratio r and the number
    of steps skipped for a non-finite gradient, over the leaf's batch axes (one per layer). A
    leaf of an `adam` group keeps its momentum, its second moment in `nu` (f32, the leaf's shape)
    and its skipped count only (`ADAM_FIELDS`; the other fields are MaskedNodes there, `nu`
    elsewhere). A state made before the adam kind existed has nu = None."""

    count: jax.Array
    momentum: Any
    prev_grad: Any
    noise: Any
    valid: Any
    prev_step: Any
    ratio: Any
    skipped: Any
    nu: Any = None


# Per-leaf state fields, and the shape each has: the leaf's ("param") or one per layer ("layers").
STATE_FIELDS = {"momentum": "param", "prev_grad": "param", "noise": "layers", "valid": "layers",
                "prev_step": "layers", "ratio": "layers", "skipped": "layers", "nu": "param"}


# What an adam leaf keeps: NAdamW's moments and the skipped count. Its noise tracker, validity,
# G_prev step and ratio would be constants (no noise, r = 1): not state, so a step moves 3 arrays
# per adam leaf through the jit, not 7 (optax.adamw: 2).
ADAM_FIELDS = ("momentum", "nu", "skipped")


def _holds(field, kind):
    """Does a leaf of this kind have this state field? (G_prev and the noise tracker for the LMO
    kinds; nu, and no tracker, for adam.)"""
    if kind == "adam":
        return field in ADAM_FIELDS
    return field != "nu"


def untracked(field, batch_shape):
    """An adam layer's value of a field it does not keep: the kernels' input, and what
    `layer_stats` reports (noise 0, not valid, no G_prev, r = 1)."""
    dtype = jnp.int32 if field == "prev_step" else jnp.float32
    return (jnp.ones if field == "ratio" else jnp.zeros)(batch_shape, dtype)


def init_state(plan, treedef, leaves, momentum_dtype, kinds):
    """The state `init` returns for planned leaves: zeros, ratio 1 (a MaskedNode for every leaf no
    group handles, and for the field its kind does not keep). `kinds`: group name -> kind."""
    n = len(leaves)
    fields = {k: [optax.MaskedNode()] * n for k in STATE_FIELDS}
    for gname, group in plan.items():
        for lf in group:
            p = leaves[lf.index]
            # Made only for the fields this leaf's kind keeps (a parameter-sized array each).
            make = {"momentum": lambda: jnp.zeros(p.shape, momentum_dtype), "nu": lambda: jnp.zeros(p.shape, jnp.float32),
                    "prev_grad": lambda: jnp.zeros(p.shape, p.dtype), "skipped": lambda: jnp.zeros(lf.batch_shape, jnp.int32)}
            for k in STATE_FIELDS:
                if _holds(k, kinds[gname]):
                    fields[k][lf.index] = make[k]() if k in make else untracked(k, lf.batch_shape)
    return LantonState(count=jnp.zeros([], jnp.int32), **{k: treedef.unflatten(v) for k, v in fields.items()})

def state_leaves(state, plan, treedef, p_leaves, kinds):
    """The state's per-leaf fields, checked against the plan: a state made for other
    parameters, labels, shapes or kinds is refused naming the leaf, not mis-read."""
    if not isinstance(state, LantonState):
        raise TypeError(f"lanton expected its own LantonState, got {type(state).__name__}")
    if state.nu is None:
        # Made before lanton had its `adam` kind (until 2026-12-07 every group stepped by its LMO).
        state = state._replace(nu=treedef.unflatten([optax.MaskedNode()] * treedef.num_leaves))
    st = {}
    for k in STATE_FIELDS:
        try:
            st[k] = treedef.flatten_up_to(getattr(state, k))
        except (ValueError, TypeError):
            raise ValueError(
                f"optimizer state field '{k}' does not match the parameters' structure: the state was made by "
                "init() for other parameters; call init() again for this model"
            ) from None
    for gname, group in plan.items():
        kind = kinds[gname]
        for lf in group:
            want = {"param": tuple(p_leaves[lf.index].shape), "layers": lf.batch_shape}
            for k, which in STATE_FIELDS.items():
                x = st[k][lf.index]
                has = not _is_masked(x) and hasattr(x, "shape")
                if k in ("prev_grad", "nu") and has != _holds(k, kind):  # (momentum, checked first, is there)
                    made, was = (("an LMO kind (embed, vector or hidden)", "'lmo'") if kind == "adam"
                                 else ("the Adam part (kind 'adam')", "'adam'"))
                    raise ValueError(
                        f"leaf '{lf.name}' (group '{lf.group}', kind '{kind}'): this optimizer state was made when the "
                        f"leaf was stepped by {made}. lanton's option 'other' decides how embeddings, heads, gains and "
                        "biases step: 'adam' (NAdamW, the default) or 'lmo' (the paper's Signum / RMS steps, the "
                        "default until 2026-12-07). To continue this state pass the 'other' (or groups) it was made "
                        f"with, here lanton.lanton(..., other={was}); or call init() again")
                if not _holds(k, kind):
                    continue
                if not has:
                    raise ValueError(
                        f"leaf '{lf.name}' (group '{lf.group}') has no optimizer state ('{k}' is {x!r}): the labels "
                        "changed since init(); call init() again"
                    )
                if tuple(x.shape) != want[which]:
                    raise ValueError(
                        f"leaf '{lf.name}': optimizer state '{k}' has shape {tuple(x.shape)}, expected "
                        f"{want[which]}: the state was made for another model or layout; call init() again"
                    )
    return st


def flatten_like(treedef, tree, what):
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} do not match the parameters' structure: {e}") from None


def find_states(opt_state) -> list:
    """Every LantonState inside an optimizer state (a chain, inject_hyperparams,
    multi_transform, an nnx.Optimizer's opt_state ...), in tree order."""
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, LantonState))
    return [x for x in found if isinstance(x, LantonState)]


def layer_stats(opt_state) -> dict:
    """Per-layer noise H, ratio r, validity and skipped-step count, keyed by leaf path, for
    logging (the paper's noise plots) and alerting (`skipped`: steps on which the layer's
    gradient was not finite, so it did not move). `opt_state` is a LantonState or any optimizer
    state that contains one (several: their leaves are merged). Values are arrays over each
    leaf's batch axes (one per layer)."""
    states = find_states(opt_state)
    if not states:
        raise ValueError(f"layer_stats: no LantonState found in the given {type(opt_state).__name__}")
    out = {}
    for state in states:
        flat = jax.tree_util.tree_flatten_with_path(state.noise, is_leaf=_is_masked)[0]
        rest = [jax.tree_util.tree_leaves(getattr(state, k), is_leaf=_is_masked) for k in ("ratio", "valid", "skipped")]
        for (path, noise), ratio, valid, skipped in zip(flat, *rest):
            if _is_masked(skipped):
                continue  # a leaf no group handles
            if _is_masked(noise):  # an adam leaf: no tracker, r = 1
                shape = jnp.shape(skipped)
                noise, ratio, valid = (untracked(k, shape) for k in ("noise", "ratio", "valid"))
            out[path_str(path)] = {"noise": noise, "ratio": ratio, "valid": valid, "skipped": skipped}
    return out
