"""`lanton(...)`: the optax GradientTransformation, its state, and the fused in-place path."""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _ffi, reference
from ._config import KINDS, StepConfig
from .labels import SPLIT_GROUPS, DimSpec, default_dim_spec, default_labels, path_str

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
    the leaf's shape; noise H, validity, step of the stored gradient and last ratio r over the
    leaf's batch axes (one entry per layer)."""

    count: jax.Array
    momentum: Any
    prev_grad: Any
    noise: Any
    valid: Any
    prev_step: Any
    ratio: Any


class _Leaf(NamedTuple):
    index: int
    name: str
    group: str
    perm: Optional[tuple]  # transpose to (batch..., rows..., cols...) or None
    permuted_shape: tuple
    canonical: tuple  # (L, R, C)
    batch_shape: tuple
    rows_are_input: bool


def _axes(spec, ndim, name, what):
    axes = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"leaf '{name}': {what} axis {a} is out of range for a rank-{ndim} leaf")
        out.append(int(a) % ndim)
    return tuple(out)


def _plan_leaf(index, name, group_name, kind, shape, spec: Optional[DimSpec], path, leaf) -> _Leaf:
    """Maps a leaf onto the kernel's (layers, rows, cols) view; batch axes become layers."""
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
        spec = spec if spec is not None else default_dim_spec(path, leaf)
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
                 tuple(shape[a] for a in batch), rows_in)


def _to_canonical(x, lf: _Leaf):
    if lf.perm is not None:
        x = jnp.transpose(x, lf.perm)
    return x.reshape(lf.canonical)


def _from_canonical(x, lf: _Leaf, shape):
    if lf.perm is None:
        return x.reshape(shape)
    x = x.reshape(lf.permuted_shape)
    return jnp.transpose(x, np.argsort(lf.perm))


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


def _resolve(tree_or_fn, params):
    return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


class _Lanton:
    """Holds the configuration; builds the per-step group calls."""

    def __init__(self, learning_rate, beta1, beta2, weight_decay, scale, *, noise_every, noise_adaptive, nesterov,
                 ratio_stat, ratio_eps, ns_coeffs, labels, groups, dim_numbers, momentum_dtype, backend,
                 ns_dtype="bfloat16"):
        if backend not in ("auto", "ffi", "reference"):
            raise ValueError(f"backend must be 'auto', 'ffi' or 'reference', got {backend!r}")
        self.learning_rate, self.beta1, self.beta2 = learning_rate, beta1, beta2
        self.weight_decay, self.scale = weight_decay, scale
        self.labels, self.dim_numbers, self.backend = labels, dim_numbers, backend
        self.groups = dict(DEFAULT_GROUPS if groups is None else groups)
        self.momentum_dtype = jnp.dtype(_static("momentum_dtype", momentum_dtype, "float32", lambda x: x))
        if self.momentum_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"momentum_dtype must be float32, bfloat16 or float16, got {self.momentum_dtype}")
        # The global options; each group's config is this with its kind (and cadence) set.
        self.base_config = StepConfig(
            kind="hidden",
            ns_coeffs=tuple(tuple(map(float, c)) for c in (ns_coeffs or StepConfig.ns_coeffs)),
            noise_every=_static("noise_every", noise_every, 10, int),
            noise_adaptive=_static("noise_adaptive", noise_adaptive, True, bool),
            ratio_stat=ratio_stat,
            ratio_eps=_static("ratio_eps", ratio_eps, 1e-30, float),
            nesterov=_static("nesterov", nesterov, False, bool),
            ns_dtype=ns_dtype,
        )
        self.configs = {}
        for name, g in self.groups.items():
            if not isinstance(g, Group):
                raise TypeError(f"group '{name}': expected lanton.Group(kind, ...), got {g!r}")
            self.configs[name] = self._group_config(g)

    def _group_config(self, g: Group) -> StepConfig:
        return dataclasses.replace(self.base_config, kind=g.kind, noise_every=int(g.noise_every or self.base_config.noise_every))

    # -- layout -----------------------------------------------------------------------------
    def plan(self, params):
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        labels = default_labels(params) if self.labels is None else _resolve(self.labels, params)
        label_leaves = self._match(labels, treedef, "labels", leaves_with_path)
        dims = None if self.dim_numbers is None else _resolve(self.dim_numbers, params)
        dim_leaves = [None] * len(leaves_with_path) if dims is None else self._match(dims, treedef, "dim_numbers", leaves_with_path)
        plan = {}
        for i, ((path, leaf), label, spec) in enumerate(zip(leaves_with_path, label_leaves, dim_leaves)):
            name = path_str(path)
            if label is None:
                continue
            if label not in self.groups:
                if label in IMPLICIT_GROUPS:  # a kind or split name works as a group even if `groups` omits it
                    self.groups[label] = IMPLICIT_GROUPS[label]
                    self.configs[label] = self._group_config(self.groups[label])
                else:
                    raise ValueError(
                        f"leaf '{name}' has label {label!r}, which is no group; known groups: {sorted(self.groups)}. "
                        f"Define it, e.g. groups={{{label!r}: lanton.Group('hidden')}}"
                    )
            dtype = jnp.dtype(leaf.dtype)
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"leaf '{name}': unsupported dtype {dtype}; lanton handles float32, bfloat16 and float16")
            if spec is not None and not isinstance(spec, DimSpec):
                spec = DimSpec(*spec)
            kind = self.groups[label].kind
            plan.setdefault(label, []).append(_plan_leaf(i, name, label, kind, tuple(leaf.shape), spec, path, leaf))
        return plan, treedef, [leaf for _, leaf in leaves_with_path]

    @staticmethod
    def _match(tree, treedef, what, leaves_with_path):
        """Flattens a labels / dim_numbers tree against the parameters, naming the first leaf
        that has no entry (None entries are allowed: the leaf is left alone)."""
        try:
            flat = treedef.flatten_up_to(tree)
        except (ValueError, TypeError):
            is_entry = lambda x: x is None or isinstance(x, (DimSpec, str))
            have = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_entry)[0]}
            missing = [path_str(p) for p, _ in leaves_with_path if path_str(p) not in have]
            detail = f"leaf '{missing[0]}' has no entry" if missing else "its structure differs"
            raise ValueError(
                f"{what} must have one entry per parameter leaf (None to leave a leaf to another "
                f"transformation): {detail}"
            ) from None
        return flat

    # -- state ------------------------------------------------------------------------------
    def init(self, params):
        plan, treedef, leaves = self.plan(params)
        n = len(leaves)
        fields = {k: [optax.MaskedNode()] * n for k in ("momentum", "prev_grad", "noise", "valid", "prev_step", "ratio")}
        for group in plan.values():
            for lf in group:
                p = leaves[lf.index]
                fields["momentum"][lf.index] = jnp.zeros(p.shape, self.momentum_dtype)
                fields["prev_grad"][lf.index] = jnp.zeros(p.shape, p.dtype)
                fields["noise"][lf.index] = jnp.zeros(lf.batch_shape, jnp.float32)
                fields["valid"][lf.index] = jnp.zeros(lf.batch_shape, jnp.float32)
                fields["prev_step"][lf.index] = jnp.zeros(lf.batch_shape, jnp.int32)
                fields["ratio"][lf.index] = jnp.ones(lf.batch_shape, jnp.float32)
        return LantonState(count=jnp.zeros([], jnp.int32), **{k: treedef.unflatten(v) for k, v in fields.items()})

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

    def apply(self, grads, state: LantonState, params, *, in_place: bool):
        if params is None:
            raise ValueError("lanton needs the parameters: call update(grads, state, params)")
        plan, treedef, p_leaves = self.plan(params)
        try:
            g_leaves = treedef.flatten_up_to(grads)
        except (ValueError, TypeError) as e:
            raise ValueError(f"gradients do not match the parameters' structure: {e}") from None
        for group in plan.values():
            for lf in group:
                g, p = g_leaves[lf.index], p_leaves[lf.index]
                if g.shape != p.shape:
                    raise ValueError(f"leaf '{lf.name}': gradient shape {g.shape} != parameter shape {p.shape}")
                if jnp.dtype(g.dtype) not in SUPPORTED_DTYPES:
                    raise TypeError(f"leaf '{lf.name}': unsupported gradient dtype {g.dtype}")
        st = {k: treedef.flatten_up_to(getattr(state, k)) for k in ("momentum", "prev_grad", "noise", "valid", "prev_step", "ratio")}
        count = optax.safe_int32_increment(state.count)
        lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate
        step_fn = self._backend()
        out_leaves = list(p_leaves) if in_place else list(g_leaves)
        new = {k: list(v) for k, v in st.items()}
        for gname, group in plan.items():
            g = self.groups[gname]
            wd = g.weight_decay if g.weight_decay is not None else (0.0 if g.kind == "vector" else self.weight_decay)
            scale = g.scale if g.scale is not None else self.scale * KIND_SCALE[g.kind]
            hyper = jnp.stack([jnp.asarray(v, jnp.float32) for v in (lr, self.beta1, self.beta2, wd, scale)])
            args = []
            for lf in group:
                i = lf.index
                args.append((
                    _to_canonical(p_leaves[i], lf),
                    _to_canonical(g_leaves[i].astype(p_leaves[i].dtype), lf),
                    _to_canonical(st["momentum"][i], lf),
                    _to_canonical(st["prev_grad"][i], lf),
                    st["noise"][i].reshape(-1),
                    st["valid"][i].reshape(-1),
                    st["prev_step"][i].reshape(-1),
                    lf.rows_are_input,
                ))
            results = step_fn(self.configs[gname], hyper, count, args, [lf.name for lf in group], in_place=in_place)
            for lf, (out, mom, prev, noise, valid, pstep, ratio) in zip(group, results):
                i, shape = lf.index, p_leaves[lf.index].shape
                out_leaves[i] = _from_canonical(out, lf, shape)
                new["momentum"][i] = _from_canonical(mom, lf, shape)
                new["prev_grad"][i] = _from_canonical(prev, lf, shape)
                for k, v in (("noise", noise), ("valid", valid), ("prev_step", pstep), ("ratio", ratio)):
                    new[k][i] = v.reshape(lf.batch_shape)
        new_state = LantonState(count=count, **{k: treedef.unflatten(v) for k, v in new.items()})
        return treedef.unflatten(out_leaves), new_state


ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


def _make(learning_rate, beta1, beta2, weight_decay, scale, kw) -> _Lanton:
    return _Lanton(learning_rate, beta1, beta2, weight_decay, scale, **kw)


def lanton(
    learning_rate: ScalarOrSchedule = 0.03,
    beta1: float = 0.8,
    beta2: float = 0.9,
    weight_decay: float = 0.0,
    scale: float = 0.2,
    *,
    noise_every: Optional[int] = None,
    noise_adaptive: bool = True,
    nesterov: bool = False,
    ratio_stat: str = "max",
    ratio_eps: Optional[float] = None,
    ns_coeffs=None,
    labels=None,
    groups: Optional[dict] = None,
    dim_numbers=None,
    momentum_dtype: str = "float32",
    backend: str = "auto",
    ns_dtype: str = "bfloat16",
) -> optax.GradientTransformationExtraArgs:
    r"""LANTON: layer-wise noise-adaptive learning rates on geometry-aware (Muon-style) updates.

    For every layer l of a group g (Hao et al., "LANTON", arXiv 2510.14009):

    .. math::
        B_l &\leftarrow \beta_1 B_l + (1-\beta_1) G_l \\
        H_l &\leftarrow \beta_2 H_l + (1-\beta_2)\,\|G_l - G_l^{prev}\|_{g,*}^2
            \quad\text{every } K \text{ steps} \\
        r_l &= \alpha_l / \max_{j \in g} \alpha_j, \quad \alpha = (H + \epsilon)^{-1/2} \\
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
        Defaults (lr 0.03, beta1 0.8, beta2 0.9, half scale for embed/vector) were tuned on the
        Shakespeare GPT benchmark (benches/results/tuning/tune.md).
      noise_every: K, refresh the noise estimate every K steps (default 10, as in the paper).
      noise_adaptive: False gives the noise-off baseline (r = 1: D-Muon / Scion-like).
      nesterov: use b1*B + (1-b1)*G as the direction's input.
      ratio_stat: reference statistic of alpha in the group ("max", "mean", "min").
      ratio_eps: epsilon in alpha = (H + eps)^(-1/2) (default 1e-30).
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

    Structural options (noise_every, ratio_eps, ns_coeffs, nesterov, noise_adaptive, groups,
    momentum_dtype) are compiled into the kernel. `optax.inject_hyperparams(lanton)` injects
    learning_rate, beta1, beta2, weight_decay and scale; pass callables for labels/dim_numbers
    and explicit numeric structural options through `static_args`.
    """
    kw = dict(noise_every=noise_every, noise_adaptive=noise_adaptive, nesterov=nesterov, ratio_stat=ratio_stat,
              ratio_eps=ratio_eps, ns_coeffs=ns_coeffs, labels=labels, groups=groups, dim_numbers=dim_numbers,
              momentum_dtype=momentum_dtype, backend=backend, ns_dtype=ns_dtype)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return impl.apply(updates, state, params, in_place=False)

    return optax.GradientTransformationExtraArgs(impl.init, update_fn)


class FusedLanton(NamedTuple):
    """init(params) -> state; step(grads, state, params) -> (new_params, new_state), jitted with
    params and state donated so the kernels update them in place."""

    init: Callable
    step: Callable


def fused(learning_rate: ScalarOrSchedule = 0.03, beta1: float = 0.8, beta2: float = 0.9, weight_decay: float = 0.0,
          scale: float = 0.2, **kwargs) -> FusedLanton:
    """The in-place fused path: same options as `lanton`, parameters written by the kernel."""
    # lanton()'s keyword-only options and their defaults: one source of truth for both entry points.
    kw = {k: p.default for k, p in inspect.signature(lanton).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"fused() got unknown options {sorted(unknown)}")
    kw.update(kwargs)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)
    step = jax.jit(lambda g, s, p: impl.apply(g, s, p, in_place=True), donate_argnums=(1, 2))
    return FusedLanton(impl.init, step)


def layer_stats(state: LantonState) -> dict:
    """Per-layer noise H, ratio r and validity from the state, keyed by leaf path, for logging
    (the paper's noise plots). Values are arrays over each leaf's batch axes (one per layer)."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(state.noise, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    ratios = jax.tree_util.tree_leaves(state.ratio, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    valids = jax.tree_util.tree_leaves(state.valid, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    for (path, noise), ratio, valid in zip(flat, ratios, valids):
        if isinstance(noise, optax.MaskedNode):
            continue
        out[path_str(path)] = {"noise": noise, "ratio": ratio, "valid": valid}
    return out
