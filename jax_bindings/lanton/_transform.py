"""`lanton(...)`: the optax GradientTransformation. Its options are checked once (`_options`),
the leaves planned (`_plan`), the state made and read (`_state`), and each group's step is one
fused call (`_ffi`), split over the devices where the inputs are laid out on a mesh (`_mesh`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _ffi, _mesh, _plan, _state, reference
from ._config import StepConfig
from ._options import (DEFAULT_GROUPS, KIND_SCALE, SUPPORTED_DTYPES, Group, ScalarOrSchedule, check_array, check_group,
                       flag, static)
from ._plan import _from_permuted, _to_permuted, noise_phases
from ._state import LantonState


class _Lanton:
    """Holds the configuration; builds the per-step group calls."""

    def __init__(self, learning_rate, beta1, beta2, weight_decay, scale, *, noise_every, noise_adaptive, nesterov,
                 ratio_stat, ratio_eps, ns_coeffs, labels, groups, dim_numbers, momentum_dtype, backend,
                 ns_dtype=None, noise_estimator=None, mesh=None, mesh_axes=None, ratio_power=None,
                 ratio_floor=None, noise_relative=None, noise_schedule=None):
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
            check_group(name, g)
        self.momentum_dtype = jnp.dtype(static("momentum_dtype", momentum_dtype, "float32", lambda x: x))
        if self.momentum_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"momentum_dtype must be float32, bfloat16 or float16, got {self.momentum_dtype}")
        # The global options; each group's config is this with its kind (and cadence) set.
        self.base_config = StepConfig(
            kind="hidden",
            ns_coeffs=StepConfig.ns_coeffs if ns_coeffs is None else _checks.ns_coeffs(ns_coeffs),
            noise_every=static("noise_every", noise_every, StepConfig.noise_every, lambda v: _checks.positive_int("noise_every", v)),
            noise_schedule=static("noise_schedule", noise_schedule, StepConfig.noise_schedule, str),
            noise_adaptive=static("noise_adaptive", noise_adaptive, StepConfig.noise_adaptive, flag("noise_adaptive")),
            ratio_stat=static("ratio_stat", ratio_stat, StepConfig.ratio_stat, str),
            ratio_eps=static("ratio_eps", ratio_eps, StepConfig.ratio_eps, lambda v: float(_checks.real("ratio_eps", v, lo=0.0))),
            ratio_power=static("ratio_power", ratio_power, StepConfig.ratio_power, lambda v: float(_checks.real("ratio_power", v, lo=0.0))),
            ratio_floor=static("ratio_floor", ratio_floor, StepConfig.ratio_floor, lambda v: float(_checks.real("ratio_floor", v, lo=0.0))),
            noise_relative=static("noise_relative", noise_relative, StepConfig.noise_relative, flag("noise_relative")),
            nesterov=static("nesterov", nesterov, StepConfig.nesterov, flag("nesterov")),
            ns_dtype=static("ns_dtype", ns_dtype, StepConfig.ns_dtype, str),
            noise_estimator=static("noise_estimator", noise_estimator, StepConfig.noise_estimator, str),
        )
        for g in self.groups.values():
            self._group_config(g)  # every declared group's config is valid (its kind above all), now
        self.mesh, self.mesh_axes = _mesh.check_mesh(mesh, mesh_axes)

    def _group_config(self, g: Group) -> StepConfig:
        k = self.base_config.noise_every if g.noise_every is None else int(np.asarray(g.noise_every))
        return dataclasses.replace(self.base_config, kind=g.kind, noise_every=k)

    def plan(self, params):
        """(plan, treedef, leaves) for these parameters (`_plan.plan`; nothing is kept)."""
        return _plan.plan(params, self.labels, self.dim_numbers, self.groups)[:3]

    def init(self, params):
        plan, treedef, leaves = self.plan(params)
        return _state.init_state(plan, treedef, leaves, self.momentum_dtype)

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
        plan, treedef, p_leaves, groups = _plan.plan(params, self.labels, self.dim_numbers, self.groups)
        g_leaves = _state.flatten_like(treedef, grads, "gradients")
        g2_leaves = None if second_grad is None else _state.flatten_like(treedef, second_grad, "second_grad")
        for group in plan.values():
            for lf in group:
                p = p_leaves[lf.index]
                for what, leaves in (("gradient", g_leaves), ("second_grad", g2_leaves)):
                    if leaves is None:
                        continue
                    g = leaves[lf.index]
                    check_array(lf.name, what, g)
                    if g.shape != p.shape:
                        raise ValueError(f"leaf '{lf.name}': {what} shape {g.shape} != parameter shape {p.shape}")
        st = _state.state_leaves(state, plan, treedef, p_leaves)
        count = optax.safe_int32_increment(state.count)
        lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate
        step_fn = self._backend()
        mesh, axes = self._work_split(plan, p_leaves, g_leaves, step_fn)
        out_leaves = list(p_leaves) if in_place else list(g_leaves)
        new = {k: list(v) for k, v in st.items()}
        for gname, group in plan.items():
            g = groups[gname]
            config = self._group_config(g)
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
            phases = noise_phases(config.noise_schedule, config.noise_every, [lf.canonical for lf in group])
            if mesh is not None and all(math.prod(lf.canonical) > 0 for lf in group):
                results = _mesh.split_group_step(mesh, axes, config, hyper, count,
                                                 [a + (len(lf.batch_shape), lf.row_axes) for a, lf in zip(args, group)],
                                                 names, phases,
                                                 in_place=in_place)
            else:
                results = step_fn(config, hyper, count, args, names, in_place=in_place, phases=phases)
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
    ratio_stat: Optional[str] = None,
    ratio_eps: Optional[float] = None,
    ns_coeffs=None,
    labels=None,
    groups: Optional[dict] = None,
    dim_numbers=None,
    momentum_dtype: str = "float32",
    backend: str = "auto",
    ns_dtype: Optional[str] = None,
    noise_estimator: Optional[str] = None,
    mesh=None,
    mesh_axes=None,
    ratio_power: Optional[float] = None,
    ratio_floor: Optional[float] = None,
    noise_relative: Optional[bool] = None,
    noise_schedule: Optional[str] = None,
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
      noise_schedule: which steps refresh which layers, each once every K steps: "synchronous"
        (the default, the paper's: every layer on steps t = 0 mod K) or "staggered" (layer i of
        each shape class of a group on steps t = i mod K, so every step does the same 1/K of the
        noise work, with no burst every K steps; ALGORITHM.md allows it). Staggered trained level
        on the plays and behind on the Python text (3 paired seeds each,
        benches/results/quality_staggered*).
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
    preprocessing, e.g. clipped the same way). On a layer's noise steps (t >= 2, t = its phase mod K; K = 1 suits
    it) the noise is then measured as ||G - G2|| instead of ||G_t - G_{t-1}||, and no gradient is
    kept across steps. Without it, Option I (the default) runs.

    Structural options (noise_every, noise_schedule, ratio_eps, ratio_power, ratio_floor, noise_relative, ns_coeffs,
    nesterov, noise_adaptive, groups, momentum_dtype) are compiled into the kernel. `optax.inject_hyperparams(lanton)` injects
    learning_rate, beta1, beta2, weight_decay and scale; pass callables for labels/dim_numbers
    and explicit numeric structural options through `static_args`.
    """
    kw = dict(noise_every=noise_every, noise_adaptive=noise_adaptive, nesterov=nesterov, ratio_stat=ratio_stat,
              ratio_eps=ratio_eps, ns_coeffs=ns_coeffs, labels=labels, groups=groups, dim_numbers=dim_numbers,
              momentum_dtype=momentum_dtype, backend=backend, ns_dtype=ns_dtype, noise_estimator=noise_estimator,
              mesh=mesh, mesh_axes=mesh_axes, ratio_power=ratio_power, ratio_floor=ratio_floor,
              noise_relative=noise_relative, noise_schedule=noise_schedule)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)

    def update_fn(updates, state, params=None, *, second_grad=None, **extra_args):
        del extra_args  # optax passes every extra argument of a chain to each member
        return impl.apply(updates, state, params, in_place=False, second_grad=second_grad)

    return optax.GradientTransformationExtraArgs(impl.init, update_fn)


def paper(learning_rate: ScalarOrSchedule = 0.03, **kwargs) -> optax.GradientTransformationExtraArgs:
    """The paper's rule as reconstructed (docs/algorithm.md): r = alpha / max alpha over the group
    (`ratio_stat="max"`, `ratio_power=1.0`, no floor), K = 10 with every layer measured on the
    same steps (`noise_schedule="synchronous"`, which may be overridden); any other option as
    `lanton()` takes it. The rate 0.03 is the one the 1500-step protocol picked for this rule on the
    Shakespeare GPT (benches/results/quality), where it trained worse than lanton's defaults."""
    rule = dict(ratio_stat="max", ratio_power=1.0, ratio_floor=0.0)
    clash = sorted(set(rule) & set(kwargs))
    if clash:
        raise TypeError(f"lanton.paper() fixes {clash}: use lanton.lanton(...) to choose them")
    # The paper's cadence (every layer on the same steps) unless asked otherwise.
    return lanton(learning_rate, **rule, **{"noise_schedule": "synchronous", **kwargs})
