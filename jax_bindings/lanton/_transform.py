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
from . import labels as lanton_labels
from .labels import DimSpec
from ._config import StepConfig, adam_config
from ._options import (KIND_SCALE, OTHER_GROUPS, SUPPORTED_DTYPES, Group, ScalarOrSchedule, check_array, check_group,
                       flag, implicit_groups, static)
from ._plan import _from_permuted, _to_permuted, noise_phases
from ._state import LantonState, untracked


def _ratio_cap(v) -> float:
    """ratio_cap: a number > 0, or infinity for none."""
    x = _checks.concrete(v)
    if x is not None and x.shape == () and x.dtype.kind == "f" and float(x) == math.inf:
        return math.inf
    return float(_checks.real("ratio_cap", v, lo=0.0, lo_open=True))


class _Lanton:
    """Holds the configuration; builds the per-step group calls."""

    def __init__(self, learning_rate, beta1, beta2, weight_decay, scale, *, noise_every, noise_adaptive, nesterov,
                 ratio_stat, ratio_eps, ns_coeffs, labels, groups, dim_numbers, momentum_dtype, backend,
                 ns_dtype=None, noise_estimator=None, mesh=None, mesh_axes=None, ratio_power=None,
                 ratio_floor=None, ratio_cap=None, noise_relative=None, noise_schedule=None, other="adam",
                 adam_learning_rate=None, adam_b1=0.9, adam_b2=0.999, adam_eps_root=None, adam_weight_decay=0.0,
                 eps=None, weight_decay_mask=None):
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
        if other not in OTHER_GROUPS:
            raise ValueError(f"lanton option 'other' must be one of {sorted(OTHER_GROUPS)}, got {other!r}")
        # The Adam part (groups of kind "adam"): optax.contrib.muon's Adam branch, NAdamW.
        self.adam_learning_rate = (None if adam_learning_rate is None
                                   else _checks.learning_rate(adam_learning_rate, "adam_learning_rate"))
        self.adam_b1 = _checks.real("adam_b1", adam_b1, lo=0.0, hi=1.0, hi_open=True)
        self.adam_b2 = _checks.real("adam_b2", adam_b2, lo=0.0, hi=1.0, hi_open=True)
        self.adam_weight_decay = _checks.real("adam_weight_decay", adam_weight_decay, lo=0.0)
        self.weight_decay_mask = weight_decay_mask
        if groups is not None and not isinstance(groups, dict):
            raise TypeError(f"lanton option 'groups' must be a dict of name -> lanton.Group, got {groups!r}")
        self.groups = dict(OTHER_GROUPS[other] if groups is None else groups)
        self.implicit = implicit_groups(other)
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
            ratio_cap=static("ratio_cap", ratio_cap, StepConfig.ratio_cap, _ratio_cap),
            noise_relative=static("noise_relative", noise_relative, StepConfig.noise_relative, flag("noise_relative")),
            nesterov=static("nesterov", nesterov, StepConfig.nesterov, flag("nesterov")),
            adam_eps=static("eps", eps, StepConfig.adam_eps, lambda v: float(_checks.real("eps", v, lo=0.0))),
            adam_eps_root=static("adam_eps_root", adam_eps_root, StepConfig.adam_eps_root,
                                 lambda v: float(_checks.real("adam_eps_root", v, lo=0.0))),
            ns_dtype=static("ns_dtype", ns_dtype, StepConfig.ns_dtype, str),
            noise_estimator=static("noise_estimator", noise_estimator, StepConfig.noise_estimator, str),
        )
        # nesterov None: lanton's plain momentum on the LMO groups, Nesterov on the Adam part (as
        # optax.contrib.muon's default); a bool sets both, as it does in optax.contrib.muon.
        self.adam_nesterov = True if nesterov is None else self.base_config.nesterov
        for g in self.groups.values():
            self._group_config(g)  # every declared group's config is valid (its kind above all), now
        self.mesh, self.mesh_axes = _mesh.check_mesh(mesh, mesh_axes)

    def _group_config(self, g: Group) -> StepConfig:
        if g.kind == "adam":
            return adam_config(self.base_config, self.adam_nesterov)
        k = self.base_config.noise_every if g.noise_every is None else int(np.asarray(g.noise_every))
        return dataclasses.replace(self.base_config, kind=g.kind, noise_every=k)

    def _group_hyper(self, g: Group, lr, count, decay):
        """(lr, beta1, beta2, weight_decay, scale) of a group's call. `decay`: the group's leaves
        are under weight decay (weight_decay_mask); adam groups take the Adam part's values."""
        if g.kind == "adam":
            if self.adam_learning_rate is None:
                a_lr = ADAM_LR_FACTOR * lr
            else:
                a_lr = self.adam_learning_rate(count) if callable(self.adam_learning_rate) else self.adam_learning_rate
            wd = self.adam_weight_decay if g.weight_decay is None else g.weight_decay
            values = (a_lr, self.adam_b1, self.adam_b2, wd, 1.0 if g.scale is None else g.scale)
        else:
            wd = g.weight_decay if g.weight_decay is not None else (0.0 if g.kind == "vector" else self.weight_decay)
            scale = g.scale if g.scale is not None else self.scale * KIND_SCALE[g.kind]
            values = (lr, self.beta1, self.beta2, wd if decay else 0.0, scale)
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])

    def _decayed_groups(self, params, plan, kinds):
        """Group name -> whether weight_decay applies (optax.contrib.muon's `weight_decay_mask`,
        for the LMO groups; a group is one call, so its leaves must agree)."""
        if self.weight_decay_mask is None:
            return {}
        _, mask = _plan.leaf_entries(self.weight_decay_mask, params, "weight_decay_mask")
        out = {}
        for gname, group in plan.items():
            if kinds[gname] == "adam":
                continue  # the mask is the Muon part's (optax.contrib.muon): adam_weight_decay has none
            values = {lf.name: bool(mask[lf.index]) for lf in group}
            if len(set(values.values())) > 1:
                on = sorted(k for k, v in values.items() if v)
                off = sorted(k for k, v in values.items() if not v)
                raise ValueError(
                    f"lanton option 'weight_decay_mask' decays {on[:3]} but not {off[:3]} of group '{gname}': a group "
                    "takes one weight decay; label the leaves without decay into a group of their own "
                    "(labels=..., groups={..., 'no_decay': lanton.Group('hidden', weight_decay=0.0)})")
            out[gname] = next(iter(values.values()), True)
        return out

    def plan(self, params):
        """(plan, treedef, leaves) for these parameters (`_plan.plan`; nothing is kept)."""
        return _plan.plan(params, self.labels, self.dim_numbers, self.groups, self.implicit)[:3]

    def kinds(self, plan, groups=None):
        """Group name -> kind, for the groups of `plan`."""
        groups = self.groups if groups is None else groups
        return {name: (groups.get(name) or self.implicit[name]).kind for name in plan}

    def init(self, params):
        plan, treedef, leaves = self.plan(params)
        return _state.init_state(plan, treedef, leaves, self.momentum_dtype, self.kinds(plan))

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
        plan, treedef, p_leaves, groups = _plan.plan(params, self.labels, self.dim_numbers, self.groups, self.implicit)
        kinds = self.kinds(plan, groups)
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
        st = _state.state_leaves(state, plan, treedef, p_leaves, kinds)
        decayed = self._decayed_groups(params, plan, kinds)
        count = optax.safe_int32_increment(state.count)
        lr = self.learning_rate(state.count) if callable(self.learning_rate) else self.learning_rate
        step_fn = self._backend()
        mesh, axes = self._work_split(plan, p_leaves, g_leaves, step_fn)
        out_leaves = list(p_leaves) if in_place else list(g_leaves)
        new = {k: list(v) for k, v in st.items()}
        for _, gname, group in _calls(plan, groups):
            g = groups[gname]
            config = self._group_config(g)
            adam = g.kind == "adam"
            hyper = self._group_hyper(g, lr, state.count, decayed.get(gname, True))
            split = mesh is not None and all(math.prod(lf.canonical) > 0 for lf in group)
            args, finite = [], []
            for lf in group:
                i = lf.index
                grad = _to_permuted(g_leaves[i].astype(p_leaves[i].dtype), lf)
                if split:
                    # The kernels skip a layer whose gradient is not finite and count it; the
                    # split's call sees the exchanged matrices, so its count is formed here.
                    finite.append(jnp.all(jnp.isfinite(grad.reshape(lf.canonical)), axis=(1, 2)))
                # An adam layer's G_prev slot holds its second moment nu (f32); it keeps no
                # tracker, so the kernels get constants for it (and its results are dropped).
                prev = _to_permuted(st["nu" if adam else "prev_grad"][i], lf)
                noise, valid, pstep = ((untracked(k, lf.batch_shape) for k in ("noise", "valid", "prev_step")) if adam
                                       else (st["noise"][i], st["valid"][i], st["prev_step"][i]))
                if g2_leaves is not None and not adam:
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
                    noise,
                    valid,
                    pstep,
                    lf.rows_are_input,
                    lf.canonical,
                ))
            names = [lf.name for lf in group]
            phases = noise_phases(config.noise_schedule, config.noise_every, [lf.canonical for lf in group])
            if split:
                results = _mesh.split_group_step(mesh, axes, config, hyper, count,
                                                 [a + (len(lf.batch_shape), lf.row_axes) for a, lf in zip(args, group)],
                                                 names, phases,
                                                 in_place=in_place)
                results = [r + (st["skipped"][lf.index] + (~fin).astype(jnp.int32).reshape(lf.batch_shape),)
                           for r, lf, fin in zip(results, group, finite)]
            else:
                results = step_fn(config, hyper, count, args, names, in_place=in_place, phases=phases,
                                  skipped=[st["skipped"][lf.index] for lf in group])
            for lf, (out, mom, prev, noise, valid, pstep, ratio, skipped) in zip(group, results):
                i = lf.index
                out_leaves[i] = _from_permuted(out, lf)
                new["momentum"][i] = _from_permuted(mom, lf)
                if adam:
                    new["nu"][i] = _from_permuted(prev, lf)
                elif g2_leaves is None:
                    new["prev_grad"][i] = _from_permuted(prev, lf)
                else:  # Option II keeps no gradient across steps: the state's G_prev stays as it was
                    pstep = st["prev_step"][i]
                tracker = (("noise", noise), ("valid", valid), ("prev_step", pstep), ("ratio", ratio))
                for k, v in tracker:
                    new[k][i] = optax.MaskedNode() if adam else v
                new["skipped"][i] = skipped
        new_state = LantonState(count=count, **{k: treedef.unflatten(v) for k, v in new.items()})
        return treedef.unflatten(out_leaves), new_state


def _calls(plan, groups):
    """The fused calls of a step, [(name, group name, leaves)]: one per group, except that adam
    groups with the same settings share one (elementwise, their leaves do not interact: the
    default's embed and vector labels step in a single call, named "embed+vector")."""
    calls, by_key = [], {}
    for gname, group in plan.items():
        g = groups[gname]
        key = (g.kind, g.scale, g.weight_decay) if g.kind == "adam" else ("group", gname)
        if key in by_key:
            name, first, leaves = calls[by_key[key]]
            calls[by_key[key]] = (name + "+" + gname, first, leaves + list(group))
        else:
            by_key[key] = len(calls)
            calls.append((gname, gname, list(group)))
    return calls


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


# The Adam part's rate when `adam_learning_rate` is None: this fraction of `learning_rate` (and of
# its schedule, step by step). optax.contrib.muon uses learning_rate itself; lanton's recipe was
# measured with Muon's tuned Adam rate, 3e-3, beside lanton's 0.0075 (benches/results/quality,
# hybrid_p05_median; docs/decisions.md).
ADAM_LR_FACTOR = 0.4

# optax.contrib.muon's options lanton cannot honour, with their neutral values and what to use instead.
_MUON_REFUSED = {
    "adaptive": (False, "lanton's own adaptive rate is its noise ratio (noise_adaptive=True); scaling by the dual "
                        "norm of the update is not implemented"),
    "preconditioning": ("frobenius", "lanton's Newton-Schulz normalizes by the Frobenius norm only"),
}


def _from_muon_names(beta1, scale, kw):
    """optax.contrib.muon's argument names, mapped onto lanton's (README "From optax.contrib.muon"):
    beta -> beta1, mu_dtype -> momentum_dtype, ns_coeffs (a triple or "standard") with ns_steps,
    consistent_rms -> scale, muon_weight_dimension_numbers -> labels and dim_numbers (a leaf with
    dimension numbers is hidden, a leaf with None goes to the Adam part); `eps` and the adam_*
    options are the Adam part's. What lanton cannot honour is refused by name."""
    kw = dict(kw)
    for name, (neutral, instead) in _MUON_REFUSED.items():
        value = kw.pop(name, neutral)
        if value != neutral:
            raise ValueError(f"lanton does not support optax.contrib.muon's {name}={value!r}: {instead}")
    beta = kw.pop("beta", None)
    if beta is not None:
        if beta1 != _DEFAULT_BETA1:
            raise TypeError("lanton: pass either beta1 or optax.contrib.muon's 'beta' (the same momentum), not both")
        beta1 = beta
    mu_dtype = kw.pop("mu_dtype", None)
    if mu_dtype is not None:
        if kw.get("momentum_dtype", "float32") != "float32":
            raise TypeError("lanton: pass either momentum_dtype or optax.contrib.muon's 'mu_dtype', not both")
        kw["momentum_dtype"] = mu_dtype
    consistent_rms = kw.pop("consistent_rms", None)
    if consistent_rms is not None:
        if scale != _DEFAULT_SCALE:
            raise TypeError("lanton: pass either scale or optax.contrib.muon's 'consistent_rms' (the same RMS target), not both")
        scale = consistent_rms
    coeffs, steps = kw.get("ns_coeffs"), kw.pop("ns_steps", None)
    if isinstance(coeffs, str):
        presets = getattr(getattr(optax.contrib, "_muon", None), "_NS_COEFFS_PRESET_DICT", {"standard": StepConfig.ns_coeffs[0]})
        if coeffs not in presets:
            raise ValueError(f"lanton option 'ns_coeffs': unknown preset {coeffs!r}; known: {sorted(presets)}")
        coeffs = presets[coeffs]
    if coeffs is not None and np.ndim(coeffs) == 1:  # one triple, repeated ns_steps times (Muon's form)
        coeffs = (tuple(coeffs),) * (5 if steps is None else _checks.positive_int("ns_steps", steps))
    elif steps is not None:
        n = len(StepConfig.ns_coeffs if coeffs is None else coeffs)
        if coeffs is not None and _checks.positive_int("ns_steps", steps) != n:
            raise ValueError(f"lanton option 'ns_steps' ({steps}) must match the {n} triples given in ns_coeffs")
        if coeffs is None:
            coeffs = (StepConfig.ns_coeffs[0],) * _checks.positive_int("ns_steps", steps)
    if coeffs is not None:
        kw["ns_coeffs"] = coeffs
    dims = kw.pop("muon_weight_dimension_numbers", None)
    if dims is not None:
        if kw.get("labels") is not None or kw.get("dim_numbers") is not None:
            raise TypeError("lanton: pass either labels/dim_numbers or optax.contrib.muon's "
                            "'muon_weight_dimension_numbers', not both")
        kw["labels"], kw["dim_numbers"] = _muon_labels(dims)
    return beta1, scale, kw


def _muon_labels(dims):
    """labels and dim_numbers functions from optax.contrib.muon's dimension numbers: a leaf with
    an entry is a hidden matrix with those axes; a leaf with None steps with the Adam part (its
    default label where that is not hidden: the LMO groups under other="lmo")."""
    def entries(params):
        return _plan.leaf_entries(dims, params, "muon_weight_dimension_numbers")

    def labels(params):
        treedef, spec = entries(params)
        default = treedef.flatten_up_to(lanton_labels.default_labels(params))
        return treedef.unflatten(["hidden" if d is not None else ("adam" if k == "hidden" else k)
                                  for d, k in zip(spec, default)])

    def dim_numbers(params):
        treedef, spec = entries(params)
        return treedef.unflatten([None if d is None else DimSpec(*d) for d in spec])

    return labels, dim_numbers


_DEFAULT_BETA1, _DEFAULT_SCALE = 0.8, 0.2


def _make(learning_rate, beta1, beta2, weight_decay, scale, kw) -> _Lanton:
    beta1, scale, kw = _from_muon_names(beta1, scale, kw)
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
    nesterov: Optional[bool] = None,
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
    ratio_cap: Optional[float] = None,
    noise_relative: Optional[bool] = None,
    noise_schedule: Optional[str] = None,
    other: str = "adam",
    adam_learning_rate: Optional[ScalarOrSchedule] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: Optional[float] = None,
    adam_weight_decay: float = 0.0,
    eps: Optional[float] = None,
    beta: Optional[float] = None,
    mu_dtype=None,
    ns_steps: Optional[int] = None,
    weight_decay_mask=None,
    muon_weight_dimension_numbers=None,
    consistent_rms: Optional[float] = None,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
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
      noise_schedule: which steps refresh which layers, each once every K steps: "staggered"
        (the default: layer i of each shape class of a group on steps t = i mod K, so every step
        does the same 1/K of the noise work, with no burst every K steps; ALGORITHM.md allows
        it) or "synchronous" (the paper's: every layer on steps t = 0 mod K; lanton.paper's).
        Why the default: docs/decisions.md.
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
      ratio_cap: r = min(cap, shaped r) (our option). Default None: 1 for the median reference
        (no layer steps faster than the group's rate), none for the others; float("inf") lifts
        it, so the quieter half of the group steps faster than the base rate.
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

    Structural options (noise_every, noise_schedule, ratio_eps, ratio_power, ratio_floor, ratio_cap, noise_relative, ns_coeffs,
    nesterov, noise_adaptive, groups, momentum_dtype) are compiled into the kernel. `optax.inject_hyperparams(lanton)` injects
    learning_rate, beta1, beta2, weight_decay and scale; pass callables for labels/dim_numbers
    and explicit numeric structural options through `static_args`.
    """
    kw = dict(noise_every=noise_every, noise_adaptive=noise_adaptive, nesterov=nesterov, ratio_stat=ratio_stat,
              ratio_eps=ratio_eps, ns_coeffs=ns_coeffs, labels=labels, groups=groups, dim_numbers=dim_numbers,
              momentum_dtype=momentum_dtype, backend=backend, ns_dtype=ns_dtype, noise_estimator=noise_estimator,
              mesh=mesh, mesh_axes=mesh_axes, ratio_power=ratio_power, ratio_floor=ratio_floor,
              ratio_cap=ratio_cap, noise_relative=noise_relative, noise_schedule=noise_schedule, other=other,
              adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2, adam_eps_root=adam_eps_root,
              adam_weight_decay=adam_weight_decay, eps=eps, beta=beta, mu_dtype=mu_dtype, ns_steps=ns_steps,
              weight_decay_mask=weight_decay_mask, muon_weight_dimension_numbers=muon_weight_dimension_numbers,
              consistent_rms=consistent_rms, adaptive=adaptive, preconditioning=preconditioning)
    impl = _make(learning_rate, beta1, beta2, weight_decay, scale, kw)

    def update_fn(updates, state, params=None, *, second_grad=None, **extra_args):
        del extra_args  # optax passes every extra argument of a chain to each member
        return impl.apply(updates, state, params, in_place=False, second_grad=second_grad)

    return optax.GradientTransformationExtraArgs(impl.init, update_fn)


def paper(learning_rate: ScalarOrSchedule = 0.03, **kwargs) -> optax.GradientTransformationExtraArgs:
    """The paper's rule as reconstructed (docs/algorithm.md): r = alpha / max alpha over the group
    (`ratio_stat="max"`, `ratio_power=1.0`, no floor), K = 10 with every layer measured on the
    same steps (`noise_schedule="synchronous"`), the LMO geometry for every leaf (`other="lmo"`;
    both may be overridden); any other option as
    `lanton()` takes it. The rate 0.03 is the one the 1500-step protocol picked for this rule on the
    Shakespeare GPT (benches/results/quality), where it trained worse than lanton's defaults."""
    rule = dict(ratio_stat="max", ratio_power=1.0, ratio_floor=0.0)
    clash = sorted(set(rule) & set(kwargs))
    if clash:
        raise TypeError(f"lanton.paper() fixes {clash}: use lanton.lanton(...) to choose them")
    # The paper's cadence (every layer on the same steps) and geometry for every leaf (Signum for
    # embeddings and heads, RMS for gains and biases) unless asked otherwise.
    return lanton(learning_rate, **rule, **{"noise_schedule": "synchronous", "other": "lmo", **kwargs})
