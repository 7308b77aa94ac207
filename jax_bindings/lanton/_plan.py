"""Leaf planning: which group each parameter leaf belongs to, and how the kernels see it
((layers, rows, cols), with its axes permuted if need be). Pure functions of the parameters and
the options."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._options import check_array
from .labels import DimSpec, default_dim_spec, default_labels, path_str, tree_context


class _Leaf(NamedTuple):
    index: int
    name: str
    group: str
    perm: Optional[tuple]  # transpose to (batch..., rows..., cols...) or None
    permuted_shape: tuple
    canonical: tuple  # (L, R, C)
    batch_shape: tuple
    rows_are_input: bool
    row_axes: int = 0  # how many axes of the permuted shape, after the batch axes, are rows


def _axes(spec, ndim, name, what):
    axes = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"leaf '{name}': {what} axis {a} is out of range for a rank-{ndim} leaf")
        out.append(int(a) % ndim)
    return tuple(out)


def _plan_leaf(index, name, group_name, kind, shape, spec: Optional[DimSpec]) -> _Leaf:
    """Maps a leaf onto the kernel's (layers, rows, cols) view; batch axes become layers.
    `spec` None: a vector's last axis (the only kind without a spec from `default_dim_spec`)."""
    ndim = len(shape)
    if kind == "vector":
        # The vector is the last axis (or the axes a DimSpec names); leading axes are layers.
        if ndim == 0:
            return _Leaf(index, name, group_name, None, shape, (1, 1, 1), (), True)
        vec = (ndim - 1,) if spec is None else tuple(sorted(
            _axes(spec.reduction_axes, ndim, name, "reduction") + _axes(spec.output_axes, ndim, name, "output")))
        red, out = (), vec
    else:
        if ndim < 2:
            raise ValueError(f"leaf '{name}' of kind '{kind}' needs at least 2 axes (d_in, d_out), got shape {shape}")
        red = _axes(spec.reduction_axes, ndim, name, "reduction")
        out = _axes(spec.output_axes, ndim, name, "output")
        if not red or not out:
            raise ValueError(f"leaf '{name}': a '{kind}' leaf needs reduction and output axes, got {spec}")
    if len(set(red) | set(out)) != len(red) + len(out):
        raise ValueError(f"leaf '{name}': reduction axes {red} and output axes {out} overlap or repeat")
    batch = tuple(a for a in range(ndim) if a not in red and a not in out)
    size = lambda axes: int(math.prod(shape[a] for a in axes))
    rows_in, perm = True, batch + red + out
    if perm == tuple(range(ndim)):
        perm = None  # already (batch..., d_in..., d_out...): a free reshape
    elif batch + out + red == tuple(range(ndim)):
        perm, rows_in, red, out = None, False, out, red  # (batch..., d_out..., d_in...): also free
    permuted = tuple(shape[a] for a in perm) if perm else tuple(shape)
    return _Leaf(index, name, group_name, perm, permuted, (size(batch), size(red), size(out)),
                 tuple(shape[a] for a in batch), rows_in, len(red))


def noise_phases(schedule: str, every: int, dims) -> np.ndarray:
    """Every layer's noise phase (its tracker is refreshed on steps t = phase mod K), leaf by leaf
    for leaves of (L, R, C) `dims`: zeros for "synchronous", and for "staggered" a layer's index
    among the group's layers of its (R, C), mod K. The twin of src/step/mod.rs `noise_phases`
    (tested equal through the FFI)."""
    total = sum(int(d[0]) for d in dims)
    if schedule == "synchronous":
        return np.zeros(total, np.int32)
    seen, out = {}, []
    for L, R, C in dims:
        first = seen.get((int(R), int(C)), 0)
        out += [(first + j) % int(every) for j in range(int(L))]
        seen[(int(R), int(C))] = first + int(L)
    return np.asarray(out, np.int32).reshape(total)


def layout_kind(kind: str, ndim: int) -> str:
    """The kind whose layout a leaf takes: an adam leaf (elementwise, the layer only the unit of
    the skip rule) is laid out as a matrix (batch axes are layers) or, below 2 axes, as a vector,
    so that the kernels' view is a free reshape of a sharded leaf too."""
    if kind != "adam":
        return kind
    return "hidden" if ndim >= 2 else "vector"


def _to_permuted(x, lf: _Leaf):
    """The leaf with its axes in (batch..., rows..., cols...) order: (L, R, C) in row-major
    order. No reshape: the kernels take the shape as it is (see _ffi.group_step)."""
    return x if lf.perm is None else jnp.transpose(x, lf.perm)


def _from_permuted(x, lf: _Leaf):
    return x if lf.perm is None else jnp.transpose(x, np.argsort(lf.perm))


def _resolve(tree_or_fn, params):
    """A labels / dim_numbers option: a function of the params, or a tree. A callable pytree with
    children (an Equinox module holding labels) is a tree, not a function."""
    is_function = callable(tree_or_fn) and (isinstance(tree_or_fn, jax.tree_util.Partial)
                                            or jax.tree_util.treedef_is_leaf(jax.tree.structure(tree_or_fn)))
    return tree_or_fn(params) if is_function else tree_or_fn


def _is_masked(x):
    return isinstance(x, optax.MaskedNode)


# optax.contrib.muon's dimension numbers (optax >= 0.2.5; none in older optax).
_MUON_DIMS = getattr(optax.contrib, "MuonDimensionNumbers", ())


def _is_entry(x):
    """A leaf of a labels / dim_numbers tree (optax.contrib.muon's dimension numbers count as DimSpecs)."""
    return x is None or _is_masked(x) or isinstance(x, (DimSpec, str)) or isinstance(x, _MUON_DIMS)


def plan(params, labels, dim_numbers, groups, implicit):
    """(plan, treedef, leaves, groups): the groups' planned leaves (group name -> [_Leaf]), the
    parameters' structure and leaves, and the groups the labels use (`groups` and the implicit
    ones a label names, `implicit`: a kind or a split name works as a group without being declared). A pure
    function: everything is decided from the names a user sees (labels.py: wrapper attributes
    such as NNX's `.value` dropped), so init and update agree whatever wrapper the tree has.
    Masked leaves (optax.multi_transform) belong to no group."""
    groups = dict(groups)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
    names = [path_str(p) for p, _ in leaves_with_path]
    labels = default_labels(params) if labels is None else _resolve(labels, params)
    label_leaves = match(labels, treedef, "labels", leaves_with_path, names)
    dims = None if dim_numbers is None else _resolve(dim_numbers, params)
    dim_leaves = [None] * len(names) if dims is None else match(dims, treedef, "dim_numbers", leaves_with_path, names)
    context = tree_context(params)
    plan = {}
    for i, ((path, leaf), name, label, spec) in enumerate(zip(leaves_with_path, names, label_leaves, dim_leaves)):
        if label is None or _is_masked(label) or _is_masked(leaf):
            continue
        if not isinstance(label, str):
            raise TypeError(f"leaf '{name}': a label must be a group name (str) or None, got {label!r}")
        if label not in groups:
            if label in implicit:  # a kind or split name works as a group even if `groups` omits it
                groups[label] = implicit[label]
            else:
                raise ValueError(
                    f"leaf '{name}' has label {label!r}, which is no group; known groups: {sorted(groups)}. "
                    f"Define it, e.g. groups={{{label!r}: lanton.Group('hidden')}}"
                )
        check_array(name, "parameter", leaf)
        if spec is not None and not isinstance(spec, DimSpec):
            spec = DimSpec(*spec)
        kind = layout_kind(groups[label].kind, len(leaf.shape))
        if spec is None:
            spec = default_dim_spec(context[name], kind)
        plan.setdefault(label, []).append(_plan_leaf(i, name, label, kind, tuple(leaf.shape), spec))
    return plan, treedef, [leaf for _, leaf in leaves_with_path], groups


def leaf_entries(tree_or_fn, params, what):
    """(treedef, [entry per parameter leaf]) of an option given as a tree or a function of the
    params (a weight-decay mask, Muon's dimension numbers; `plan` does the same for labels and
    dim_numbers on the flattening it keeps), by `match`."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
    names = [path_str(p) for p, _ in leaves_with_path]
    return treedef, match(_resolve(tree_or_fn, params), treedef, what, leaves_with_path, names)


def match(tree, treedef, what, leaves_with_path, names):
    """One entry of a labels / dim_numbers tree per parameter leaf (None: the leaf is left
    alone). The tree may mirror the parameters; be a prefix of them, an entry at a subtree's
    root standing for every leaf under it (as optax's masks and optax.contrib.muon's
    dimension numbers); or match them by name, a name also standing for the leaves under it:
    wrappers (NNX Variables) and masked positions (optax.multi_transform) need not be
    mirrored."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        pass
    params = treedef.unflatten([leaf for _, leaf in leaves_with_path])
    try:
        spread = jax.tree.map(lambda entry, sub: jax.tree.map(lambda _: entry, sub, is_leaf=_is_masked),
                              tree, params, is_leaf=_is_entry)
        return treedef.flatten_up_to(spread)
    except (ValueError, TypeError):
        pass
    entries = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_entry)[0]}
    out = []
    for (_, leaf), name in zip(leaves_with_path, names):
        if _is_masked(leaf):
            out.append(None)
            continue
        parts = name.split("/")
        # The leaf's own name first, then the subtrees holding it, innermost first.
        owner = next((k for k in ("/".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in entries), None)
        if owner is None and "<root>" in entries:
            owner = "<root>"
        if owner is None:
            raise ValueError(
                f"{what} must have an entry for every parameter leaf, or for a subtree holding it (None to "
                f"leave a leaf to another transformation): leaf '{name}' has none"
            )
        out.append(entries[owner])
    return out
