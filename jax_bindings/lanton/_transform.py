"""`lanton(...)`: the optax GradientTransformation, its state, and the fused in-place path."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _ffi, _mesh, reference
from ._config import KINDS, StepConfig
from .labels import SPLIT_GROUPS, DimSpec, default_dim_spec, default_labels, path_str, tree_context

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Group(NamedTuple):
    """A layer group: one LMO kind; optional per-group scale, weight decay and noise cadence.

    weight_decay=None takes the transformation's weight_decay for `hidden` and `embed` groups
    and 0 for `vector` groups (norm gains and biases are not decayed)."""

    kind: str
    scale: Optional[float] = None
    weight_decay: Optional[float] = None
    noise_every: Optional[int] = None


DEFAULT_GROUPS = {k: Group(k) for k in KINDS}
# A group without its own scale uses `scale` times its kind's factor: embeddings/heads (sign) and
# gains/biases (RMS) step at half the hidden matrices' RMS by default. Tuned on the Shakespeare
# GPT (benches/results/tuning/tune.md: 0.1 beat 0.2 and 0.4 at scale 0.2).
KIND_SCALE = {"hidden": 1.0, "embed": 0.5, "vector": 0.5}
# Labels that work as groups without being declared: the kinds, and the split hidden groups.
IMPLICIT_GROUPS = {**DEFAULT_GROUPS, **{g: Group("hidden") for g in SPLIT_GROUPS}}


class LantonState(NamedTuple):
    """Per leaf (a MaskedNode for leaves no group handles): momentum and previous gradient in
    the leaf's shape; noise H, validity, step of the stored gradient, last ratio r and the number
    of steps skipped for a non-finite gradient, over the leaf's batch axes (one per layer)."""

    count: jax.Array
    momentum: Any
    prev_grad: Any
    noise: Any
    valid: Any
    prev_step: Any
    ratio: Any
    skipped: Any


# Per-leaf state fields, and the shape each has: the leaf's ("param") or one per layer ("layers").
STATE_FIELDS = {"momentum": "param", "prev_grad": "param", "noise": "layers", "valid": "layers",
                "prev_step": "layers", "ratio": "layers", "skipped": "layers"}


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


def _to_permuted(x, lf: _Leaf):
    """The leaf with its axes in (batch..., rows..., cols...) order: (L, R, C) in row-major
    order. No reshape: the kernels take the shape as it is (see _ffi.group_step)."""
    return x if lf.perm is None else jnp.transpose(x, lf.perm)


def _from_permuted(x, lf: _Leaf):
    return x if lf.perm is None else jnp.transpose(x, np.argsort(lf.perm))


def _static(name, value, default, cast):
    """A structural option: a compile-time attribute of the custom call, never traced."""
    if value is None:
        return default
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"lanton option '{name}' is structural (compiled into the kernel) and cannot be traced; with "
            f"optax.inject_hyperparams pass static_args=('{name}',)"
        )
    return cast(value)


def _flag(name):
    def cast(value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"lanton option '{name}' must be True or False, got {value!r}")
        return bool(value)
    return cast


def _resolve(tree_or_fn, params):
    """A labels / dim_numbers option: a function of the params, or a tree. A callable pytree with
    children (an Equinox module holding labels) is a tree, not a function."""
    is_function = callable(tree_or_fn) and (isinstance(tree_or_fn, jax.tree_util.Partial)
                                            or jax.tree_util.treedef_is_leaf(jax.tree.structure(tree_or_fn)))
    return tree_or_fn(params) if is_function else tree_or_fn


def _is_masked(x):
    return isinstance(x, optax.MaskedNode)


def _is_entry(x):
    """A leaf of a labels / dim_numbers tree."""
    return x is None or _is_masked(x) or isinstance(x, (DimSpec, str))


def _check_group(name, g):
    if not isinstance(g, Group):
        raise TypeError(f"group '{name}': expected lanton.Group(kind, ...), got {g!r}")
    what = f"Group '{name}' option"
    if g.scale is not None:
        _checks.real("scale", g.scale, lo=0.0, lo_open=True, what=what)
    if g.weight_decay is not None:
        _checks.real("weight_decay", g.weight_decay, lo=0.0, what=what)
    if g.noise_every is not None:
        _checks.positive_int("noise_every", g.noise_every, what=what)


class _Lanton:
    """Holds the configuration; builds the per-step group calls."""

    def __init__(self, learning_rate, beta1, beta2, weight_decay, scale, *, noise_every, noise_adaptive, nesterov,
                 ratio_stat, ratio_eps, ns_coeffs, labels, groups, dim_numbers, momentum_dtype, backend,
                 ns_dtype="bfloat16", noise_estimator="auto", mesh=None, mesh_axes=None, ratio_power=None,
                 ratio_floor=None, noise_relative=None):
        if backend not in ("auto", "ffi", "reference"):
            raise ValueError(f"backend must be 'auto', 'ffi' or 'reference', got {backend!r}")
        if backend != "reference":
            problem = _ffi.environment_problem()  # e.g. LANTON_NUM_THREADS=abc: fail here, by name
            if problem:
                raise ValueError(f"lanton: {problem}")
        # Every concrete value is checked here, by name (traced ones cannot be: see _checks).
        self.learning_rate = _checks.learning_rate(learning_rate)
        self.beta1 = _checks.real("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
        self.beta2 = _checks.real("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
        self.weight_decay = _checks.real("weight_decay", weight_decay, lo=0.0)
        self.scale = _checks.real("scale", scale, lo=0.0, lo_open=True)
        for what, tree in (("labels", labels), ("dim_numbers", dim_numbers)):
            if isinstance(tree, str):
                raise TypeError(f"lanton option '{what}' must be a pytree or a function of the params, got {tree!r}")
        self.labels, self.dim_numbers, self.backend = labels, dim_numbers, backend
        if groups is not None and not isinstance(groups, dict):
            raise TypeError(f"lanton option 'groups' must be a dict of name -> lanton.Group, got {groups!r}")
        self.groups = dict(DEFAULT_GROUPS if groups is None else groups)
        for name, g in self.groups.items():
            _check_group(name, g)
        self.momentum_dtype = jnp.dtype(_static("momentum_dtype", momentum_dtype, "float32", lambda x: x))
        if self.momentum_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"momentum_dtype must be float32, bfloat16 or float16, got {self.momentum_dtype}")
        # The global options; each group's config is this with its kind (and cadence) set.
        self.base_config = StepConfig(
            kind="hidden",
            ns_coeffs=StepConfig.ns_coeffs if ns_coeffs is None else _checks.ns_coeffs(ns_coeffs),
            noise_every=_static("noise_every", noise_every, StepConfig.noise_every, lambda v: _checks.positive_int("noise_every", v)),
            noise_adaptive=_static("noise_adaptive", noise_adaptive, StepConfig.noise_adaptive, _flag("noise_adaptive")),
            ratio_stat=ratio_stat,
            ratio_eps=_static("ratio_eps", ratio_eps, StepConfig.ratio_eps, lambda v: float(_checks.real("ratio_eps", v, lo=0.0))),
            ratio_power=_static("ratio_power", ratio_power, StepConfig.ratio_power, lambda v: float(_checks.real("ratio_power", v, lo=0.0))),
            ratio_floor=_static("ratio_floor", ratio_floor, StepConfig.ratio_floor, lambda v: float(_checks.real("ratio_floor", v, lo=0.0))),
            noise_relative=_static("noise_relative", noise_relative, StepConfig.noise_relative, _flag("noise_relative")),
            nesterov=_static("nesterov", nesterov, StepConfig.nesterov, _flag("nesterov")),
            ns_dtype=ns_dtype,
            noise_estimator=noise_estimator,
        )
        self.configs = {name: self._group_config(g) for name, g in self.groups.items()}
        self.mesh, self.mesh_axes = _mesh.check_mesh(mesh, mesh_axes)

    def _group_config(self, g: Group) -> StepConfig:
        k = self.base_config.noise_every if g.noise_every is None else int(np.asarray(g.noise_every))
        return dataclasses.replace(self.base_config, kind=g.kind, noise_every=k)

    # -- layout -----------------------------------------------------------------------------
    def plan(self, params):
        """Groups of planned leaves. Everything is decided from the names a user sees (labels.py:
        wrapper attributes such as NNX's `.value` dropped), so init and update agree whatever
        wrapper the tree has. Masked leaves (optax.multi_transform) belong to no group."""
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
        names = [path_str(p) for p, _ in leaves_with_path]
        labels = default_labels(params) if self.labels is None else _resolve(self.labels, params)
        label_leaves = self._match(labels, treedef, "labels", leaves_with_path, names)
        dims = None if self.dim_numbers is None else _resolve(self.dim_numbers, params)
        dim_leaves = [None] * len(names) if dims is None else self._match(dims, treedef, "dim_numbers", leaves_with_path, names)
        context = tree_context(params)
        plan = {}
        for i, ((path, leaf), name, label, spec) in enumerate(zip(leaves_with_path, names, label_leaves, dim_leaves)):
            if label is None or _is_masked(label) or _is_masked(leaf):
                continue
            if not isinstance(label, str):
                raise TypeError(f"leaf '{name}': a label must be a group name (str) or None, got {label!r}")
            if label not in self.groups:
                if label in IMPLICIT_GROUPS:  # a kind or split name works as a group even if `groups` omits it
                    self.groups[label] = IMPLICIT_GROUPS[label]
                    self.configs[label] = self._group_config(self.groups[label])
                else:
                    raise ValueError(
                        f"leaf '{name}' has label {label!r}, which is no group; known groups: {sorted(self.groups)}. "
                        f"Define it, e.g. groups={{{label!r}: lanton.Group('hidden')}}"
                    )
            _check_array(name, "parameter", leaf)
            if spec is not None and not isinstance(spec, DimSpec):
                spec = DimSpec(*spec)
            kind = self.groups[label].kind
            if spec is None:
                spec = default_dim_spec(context[name], kind)
            plan.setdefault(label, []).append(_plan_leaf(i, name, label, kind, tuple(leaf.shape), spec))
        return plan, treedef, [leaf for _, leaf in leaves_with_path]

    @staticmethod
    def _match(tree, treedef, what, leaves_with_path, names):
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

    # -- state ------------------------------------------------------------------------------
    def init(self, params):
        plan, treedef, leaves = self.plan(params)
        n = len(leaves)
        fields = {k: [optax.MaskedNode()] * n for k in STATE_FIELDS}
        for group in plan.values():
            for lf in group:
                p = leaves[lf.index]
                fields["momentum"][lf.index] = jnp.zeros(p.shape, self.momentum_dtype)
                fields["prev_grad"][lf.index] = jnp.zeros(p.shape, p.dtype)
                fields["noise"][lf.index] = jnp.zeros(lf.batch_shape, jnp.float32)
                fields["valid"][lf.index] = jnp.zeros(lf.batch_shape, jnp.float32)
                fields["prev_step"][lf.index] = jnp.zeros(lf.batch_shape, jnp.int32)
                fields["ratio"][lf.index] = jnp.ones(lf.batch_shape, jnp.float32)
                fields["skipped"][lf.index] = jnp.zeros(lf.batch_shape, jnp.int32)
        return LantonState(count=jnp.zeros([], jnp.int32), **{k: treedef.unflatten(v) for k, v in fields.items()})

    def _state_leaves(self, state, plan, treedef, p_leaves):
        """The state's per-leaf fields, checked against the plan: a state made for other
        parameters, labels or shapes is refused naming the leaf, not mis-read."""
        if not isinstance(state, LantonState):
            raise TypeError(f"lanton expected its own LantonState, got {type(state).__name__}")
        st = {}
        for k in STATE_FIELDS:
            try:
                st[k] = treedef.flatten_up_to(getattr(state, k))
            except (ValueError, TypeError):
                raise ValueError(
                    f"optimizer state field '{k}' does not match the parameters' structure: the state was made by "
                    "init() for other parameters; call init() again for this model"
                ) from None
        for group in plan.values():
            for lf in group:
                want = {"param": tuple(p_leaves[lf.index].shape), "layers": lf.batch_shape}
                for k, which in STATE_FIELDS.items():
                    x = st[k][lf.index]
                    if _is_masked(x) or not hasattr(x, "shape"):
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

    # -- step -------------------------------------------------------------------------------
    def _backend(self):
        if self.backend == "reference":
            return reference.group_step
        if self.backend == "ffi" or _ffi.available():
            return _ffi.group_step
        if not getattr(self, "_warned", False):
            warnings.warn("lanton: fused kernels unavailable for this platform; using the pure-JAX reference", stacklevel=3)
            self._warned = True
        return reference.group_step

    def _work_split(self, plan, p_leaves, g_leaves, step_fn):
        """(mesh, axes) to divide the groups' work over, or (None, None): every device repeats
        the step. `mesh=` given: that one. Default: the mesh the parameters and gradients are
        laid out on, when it has several devices and no axis is manual (in the user's own
        shard_map each device steps its local arrays, and sharded parameters are refused, with
        either backend). `mesh=False`: never."""
        if self.mesh is False:
            return None, None
        mesh = _mesh.input_mesh([(lf.name, what, x[lf.index]) for group in plan.values() for lf in group
                                 for what, x in (("parameter", p_leaves), ("gradient", g_leaves))])
        if mesh is not None and getattr(mesh, "manual_axes", ()):
            _check_local_params(plan, p_leaves)
            return None, None
        if step_fn is not _ffi.group_step:
            return None, None
        if self.mesh is not None:
            return self.mesh, self.mesh_axes
        return (None, None) if mesh is None else (mesh, tuple(mesh.axis_names))

    def apply(self, grads, state: LantonState, params, *, in_place: bool, second_grad=None):
        if params is None:
            raise ValueError("lanton needs the parameters: call update(grads, state, params)")
        plan, treedef, p_leaves = self.plan(params)
        g_leaves = _flatten_like(treedef, grads, "gradients")
        g2_leaves = None if second_grad is None else _flatten_like(treedef, second_grad, "second_grad")
        for group in plan.values():
            for lf in group:
                p = p_leaves[lf.index]
                for what, leaves in (("gradient", g_leaves), ("second_grad", g2_leaves)):
                    if leaves is None:
                        continue
                    g = leaves[lf.index]
                    _check_array(lf.name, what, g)
                    if g.shape != p.shape:
                        raise ValueError(f"leaf '{lf.name}': {what} shape {g.shape} != parameter shape {p.shape}")
        st = self._state_leaves(state, plan, treedef, p_leaves)
        count = optax.safe_int32_increment(state.count)
        lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate
        step_fn = self._backend()
        mesh, axes = self._work_split(plan, p_leaves, g_leaves, step_fn)
        out_leaves = list(p_leaves) if in_place else list(g_leaves)
        new = {k: list(v) for k, v in st.items()}
        for gname, group in plan.items():
            g = self.groups[gname]
            wd = g.weight_decay if g.weight_decay is not None else (0.0 if g.kind == "vector" else self.weight_decay)
            scale = g.scale if g.scale is not None else self.scale * KIND_SCALE[g.kind]
            hyper = jnp.stack([jnp.asarray(v, jnp.float32) for v in (lr, self.beta1, self.beta2, wd, scale)])
            args, finite = [], []
            for lf in group:
                i = lf.index
                grad = _to_permuted(g_leaves[i].astype(p_leaves[i].dtype), lf)
                # The kernels skip a layer whose gradient is not finite; count it for the user.
                finite.append(jnp.all(jnp.isfinite(grad.reshape(lf.canonical)), axis=(1, 2)))
                prev, pstep = _to_permuted(st["prev_grad"][i], lf), st["prev_step"][i]
                if g2_leaves is not None:
                    # Option II: the kernels' G_prev is the second gradient, marked as stored on
                    # the step before, so a noise step measures ||G - G2||; a layer whose second
                    # gradient is not finite is marked unusable (its noise is left alone).
                    g2 = _to_permuted(g2_leaves[i].astype(p_leaves[i].dtype), lf)
                    fin2 = jnp.all(jnp.isfinite(g2.reshape(lf.canonical)), axis=(1, 2)).reshape(lf.batch_shape)
                    prev = g2.astype(prev.dtype)
                    pstep = jnp.where(fin2, count - 1, 0).astype(pstep.dtype)
                args.append((
                    _to_permuted(p_leaves[i], lf),
                    grad,
                    _to_permuted(st["momentum"][i], lf),
                    prev,
                    st["noise"][i],
                    st["valid"][i],
                    pstep,
                    lf.rows_are_input,
                    lf.canonical,
                ))
            names = [lf.name for lf in group]
            if mesh is not None and all(math.prod(lf.canonical) > 0 for lf in group):
                results = _mesh.split_group_step(mesh, axes, self.configs[gname], hyper, count,
                                                 [a + (len(lf.batch_shape), lf.row_axes) for a, lf in zip(args, group)],
                                                 names,
                                                 in_place=in_place)
            else:
                results = step_fn(self.configs[gname], hyper, count, args, names, in_place=in_place)
            for lf, fin, (out, mom, prev, noise, valid, pstep, ratio) in zip(group, finite, results):
                i = lf.index
                out_leaves[i] = _from_permuted(out, lf)
                new["momentum"][i] = _from_permuted(mom, lf)
                if g2_leaves is None:
                    new["prev_grad"][i] = _from_permuted(prev, lf)
                else:  # Option II keeps no gradient across steps: the state's G_prev stays as it was
                    pstep = st["prev_step"][i]
                skipped = st["skipped"][i] + (~fin).astype(jnp.int32).reshape(lf.batch_shape)
                for k, v in (("noise", noise), ("valid", valid), ("prev_step", pstep), ("ratio", ratio), ("skipped", skipped)):
                    new[k][i] = v
        new_state = LantonState(count=count, **{k: treedef.unflatten(v) for k, v in new.items()})
        return treedef.unflatten(out_leaves), new_state


def _flatten_like(treedef, tree, what):
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} do not match the parameters' structure: {e}") from None


def _check_local_params(plan, p_leaves):
    """Inside the user's shard_map each device steps the arrays it holds, as whole matrices. A
    parameter that varies over a manual axis is a shard (or a different model per device):
    refused by default, since a shard's polar factor is not a shard of the matrix's; mesh=False
    says each device holds whole matrices of its own."""
    typeof = getattr(jax, "typeof", None)
    for lf in (lf for group in plan.values() for lf in group if typeof is not None):
        aval = typeof(p_leaves[lf.index])
        # The manual axes a value varies over: aval.mat.varying in newer jax, aval.vma in older.
        mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None)
        varying = sorted(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
        if varying:
            raise ValueError(
                f"lanton: inside shard_map the parameter '{lf.name}' varies over the manual axes {varying}: each "
                "device would orthogonalize its shard as a whole matrix. Pass the parameters replicated (in_specs "
                "P()), or call lanton outside shard_map under jit, where it divides the work over the mesh itself; "
                "lanton(..., mesh=False) if every device holds whole matrices of its own")


def _check_array(name, what, x):
    """A handled leaf must be a float array lanton supports (not a Python number or None)."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(
            f"leaf '{name}': the {what} must be a JAX array of float32, bfloat16 or float16, got "
            f"{type(x).__name__} {x!r}; wrap it in jnp.asarray(...) or label it None"
        )
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"leaf '{name}': unsupported dtype {x.dtype} of the {what}; lanton handles float32, bfloat16 and float16")


ScalarOrSchedule = optax.ScalarOrSchedule  # optax's own annotation: its generic checks read it


def _make(learning_rate, beta1, beta2, weight_decay, scale, kw) -> _Lanton:
    return _Lanton(learning_rate, beta1, beta2, weight_decay, scale, **kw)


def lanton(
    learning_rate: ScalarOrSchedule = 0.0075,
    beta1: float = 0.8,
    beta2: float = 0.9,
    weight_decay: float = 0.0,
    scale: float = 0.2,
    *,
    noise_every: Optional[int] = None,
    noise_adaptive: bool = True,
    nesterov: bool = False,
    ratio_stat: str = "median",
    ratio_eps: Optional[float] = None,
    ns_coeffs=None,
    labels=None,
    groups: Optional[dict] = None,
    dim_numbers=None,
    momentum_dtype: str = "float32",
    backend: str = "auto",
    ns_dtype: str = "bfloat16",
    noise_estimator: str = "auto",
    mesh=None,
    mesh_axes=None,
    ratio_power: Optional[float] = None,
    ratio_floor: Optional[float] = None,
    noise_relative: Optional[bool] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LANTON: layer-wise noise-adaptive learning rates on geometry-aware (Muon-style) updates.

    For every layer l of a group g (Hao et al., "LANTON", arXiv 2510.14009):

    .. math::
        B_l &\leftarrow \beta_1 B_l + (1-\beta_1) G_l \\
        H_l &\leftarrow \beta_2 H_l + (1-\beta_2)\,\|G_l - G_l^{prev}\|_{g,*}^2
            \quad\text{every } K \text{ steps} \\
        r_l &= \min\big(1, (\alpha_l / \operatorname{median}_{j \in g} \alpha_j)^p\big),
            \quad \alpha = (H + \epsilon)^{-1/2} \\
        \Delta X_l &= -\eta_t\,(\lambda X_l + s_g\, r_l\, D_g(B_l))

    with D_g the LMO direction of the group's kind (hidden: Newton-Schulz polar factor, embed:
    sign, vector: RMS normalization) and s_g its scale (hidden: scale * sqrt(max(d_in, d_out))).
    The updates already include the learning rate (add them with `optax.apply_updates`).

    Args:
      learning_rate: float, traced value or schedule (a function of the step count).
      beta1: momentum EMA. beta2: EMA of the noise tracker H.
      weight_decay: decoupled, at the base rate (not scaled by r); `vector` groups get 0 unless
        their Group says otherwise.
      scale: update RMS target of hidden matrices (0.2 matches AdamW's, as in D-Muon); embed and
        vector groups use half of it (`KIND_SCALE`); a Group's own scale overrides both.
        Defaults (beta1 0.8, beta2 0.9, half scale for embed/vector) were tuned on the
        Shakespeare GPT benchmark (benches/results/tuning/tune.md); lr 0.0075 is the rate the
        3-seed protocol picked for the median reference (benches/results/quality), about optax
        Muon's tuned rate there (0.00707).
      noise_every: K, refresh the noise estimate every K steps (default 10, as in the paper).
      noise_adaptive: False gives the noise-off baseline (r = 1: D-Muon / Scion-like).
      nesterov: use b1*B + (1-b1)*G as the direction's input.
      ratio_stat: reference statistic of alpha in the group ("median", "max", "mean", "min").
        "median" (the default, ours) caps r at 1 (the quieter half steps at the base rate): one
        layer whose gradient fades (H -> 0) then sets no one's rate, as it does under the
        paper's "max" (a dying MLP in block 0 became the reference and throttled every hidden
        layer to r ~ 0.05-0.2: one hybrid seed on the plays, all three seeds of plain lanton
        on another text, benches/results/quality and quality_other_text).
      ratio_eps: epsilon in alpha = (H + eps)^(-1/2) (default 1e-30).
      ratio_power, ratio_floor: ratio shaping (our option): r = max(r_min, (alpha / stat(alpha))^p).
        Defaults None mean p = 0.5, r_min = 0 (None, so that `optax.inject_hyperparams` leaves
        them alone). The paper's rule is p = 1; p = 0.5 trained better than it, than noise-off
        and than tuned optax Muon, by more than the seed spread, on our 3-seed benchmark
        (benches/results/quality). p < 1 narrows the spread of the layers' rates (p = 0: every
        layer at the base rate, noise still tracked); r_min bounds how far a noisy layer's rate
        may fall. Measured effects: README "Training quality".
      noise_relative: measure each layer's noise relative to its signal (our option, default
        False): H tracks (||G - G_prev|| / ||B||)^2 in the group's dual norm, B the momentum, so a
        layer whose gradient is large but steady is not slowed for its size. CPU kernels and the
        reference only (the CUDA kernels refuse it). Measured effect: README "Training quality".
      ns_coeffs: Newton-Schulz (a, b, c) triples, one per step (default: muon.py's, 5 steps).
      labels: pytree of group names (or None to leave a leaf to another transformation: its
        update passes through unchanged), or a function of the params returning one. Default:
        `lanton.labels.default_labels`.
      groups: dict of name -> `lanton.Group`; default one group per kind, named after it.
      dim_numbers: pytree (or function of params) of `lanton.DimSpec` or None per leaf.
      momentum_dtype: dtype of the momentum buffers.
      backend: "auto" (fused kernels where available, else pure JAX), "ffi" or "reference".
      ns_dtype: Newton-Schulz operand dtype of the CUDA kernels, "bfloat16" (default) or
        "float32"; accumulation is f32 either way. CPU kernels and the reference use f32.
      noise_estimator: how the noise estimate computes the nuclear norm: "auto" (the
        platform's kernels' choice: Gram-matrix eigenvalues on CPU, ~1e-5 relative error at
        0.2-0.5x a Newton-Schulz from 256 rows up; 7 polar iterations on CUDA, <= 1 %), "eigen" (CPU only)
        or "polar".
      mesh, mesh_axes: divide each group's work among the devices of these axes of a
        `jax.sharding.Mesh` (default: all its axes) when the fused kernels run under jit: each
        leaf is taken as shards (on its layer axis, d_in or d_out), an all_to_all makes each
        device's equal run of every shape class whole matrices on it, the kernel does the
        momentum, noise estimate and direction of those only, the per-layer trackers are
        all-gathered so the ratios equal one device's, and the directions go back to the shards,
        where the update is applied. Each matrix is orthogonalized once per step in total, no
        parameter is gathered whole, state stays laid out like its parameter (lanton._mesh).
        Default (None): the mesh the parameters and gradients are laid out on, over all its
        axes. mesh=False: every device repeats the whole step.

    Option II of the paper's Algorithm 1: pass an independent second gradient of the same step,
    ``update(grads, state, params, second_grad=grads2)`` (a pytree like `grads`, through the same
    preprocessing, e.g. clipped the same way). On noise steps (t >= 2, t % K == 0; K = 1 suits
    it) the noise is then measured as ||G - G2|| instead of ||G_t - G_{t-1}||, and no gradient is
    kept across steps. Without it, Option I (the default) runs.

    Structural options (noise_every, ratio_eps, ratio_power, ratio_floor, noise_relative, ns_coeffs,
    nesterov, noise_adaptive, groups, momentum_dtype) are compiled into the kernel. `optax.inject_hyperparams(lanton)` injects
    learning_rate, beta1, beta2, weight_decay and scale; pass callables for labels/dim_numbers
    and explicit numeric structural options through `static_args`.
    """
    kw = dict(noise_every=noise_every, noise_adaptive=noise_adaptive, nesterov=nesterov, ratio_stat=ratio_stat,
              ratio_eps=ratio_eps, ns_coeffs=ns_coeffs, labels=labels, groups=groups, dim_numbers=dim_numbers,
              momentum_dtype=momentum_dtype, backend=backend, ns_dtype=ns_dtype, noise_estimator=noise_estimator,
              mesh=mesh, mesh_axes=mesh_axes, ratio_power=ratio_power, ratio_floor=ratio_floor,
              noise_relative=noise_relative)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)

    def update_fn(updates, state, params=None, *, second_grad=None, **extra_args):
        del extra_args  # optax passes every extra argument of a chain to each member
        return impl.apply(updates, state, params, in_place=False, second_grad=second_grad)

    return optax.GradientTransformationExtraArgs(impl.init, update_fn)


class FusedLanton(NamedTuple):
    """init(params) -> state; step(grads, state, params) -> (new_params, new_state), jitted with
    params and state donated so the kernels update them in place."""

    init: Callable
    step: Callable


def fused(learning_rate: ScalarOrSchedule = 0.0075, beta1: float = 0.8, beta2: float = 0.9, weight_decay: float = 0.0,
          scale: float = 0.2, **kwargs) -> FusedLanton:
    """The in-place fused path: same options as `lanton`, parameters written by the kernel.

    `step(grads, state, params) -> (params, state)` donates state and params; `step.lower(grads,
    state, params)` lowers the jitted step for inspection (its outputs in (state, params) order)."""
    # lanton()'s keyword-only options and their defaults: one source of truth for both entry points.
    kw = {k: p.default for k, p in inspect.signature(lanton).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"fused() got unknown options {sorted(unknown)}")
    kw.update(kwargs)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)
    # jit pairs donated inputs with outputs of the same shape in argument order, not by name:
    # returning (state, params) in the order they are passed lets each buffer be updated where
    # it lies. Returning (params, state) would pair the new params with the old momentum (the
    # first donated input of that shape), and XLA would copy every parameter and state buffer.
    body = lambda g, s, p: impl.apply(g, s, p, in_place=True)[::-1]
    inner = jax.jit(body, donate_argnums=(1, 2))
    # Laid-out inputs come back in their own layouts (the work split leaves its own otherwise,
    # and a changed layout would make the next call compile again): one jit per layout.
    by_layout = {}

    def step(grads, state, params):
        leaves, tree = jax.tree.flatten((state, params))
        layouts = [getattr(x, "sharding", None) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                   else None for x in leaves]
        f = inner
        if any(isinstance(s, jax.sharding.NamedSharding) for s in layouts):
            # (None: XLA's choice, for an input not laid out on a mesh.)
            layouts = [s if isinstance(s, jax.sharding.NamedSharding) else None for s in layouts]
            key = (tree, tuple(layouts))
            if key not in by_layout:
                by_layout[key] = jax.jit(body, donate_argnums=(1, 2), out_shardings=tree.unflatten(layouts))
            f = by_layout[key]
        new_state, new_params = f(grads, state, params)
        return new_params, new_state

    step.lower = inner.lower  # for inspecting the compiled step (outputs in (state, params) order)
    return FusedLanton(impl.init, step)


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
            if _is_masked(noise):
                continue
            out[path_str(path)] = {"noise": noise, "ratio": ratio, "valid": valid, "skipped": skipped}
    return out
