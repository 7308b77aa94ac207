"""lanton across devices: which mesh to divide a step over, and the divided group step.

The divided step (`split_group_step`), inside `jax.shard_map` over the mesh axes given:

    every leaf enters as shards: on its layer axis, else its d_in, else its d_out (the first
        whose size the device count divides; otherwise whole)
    per shape class (R, C), the group's layers are stacked and dealt out in equal runs: an
        all_to_all makes each device's run whole matrices on it (a layer-sharded leaf is
        already whole where it lies)
    each device runs the fused kernel on its run only: momentum, the noise estimate and the
        direction D of each matrix once per step in total, never once per device
    the kernel's per-layer trackers are all-gathered (a few floats per layer); every device
        forms the group's ratios r from them as one device would (to f32 round-off: the
        f32 formula of _rules, where the kernels use f64)
    the directions s * D go back to the shards by the reverse all_to_all, and each device
        applies delta = -lr * (wd * X + r * (s * D)) to its own shards, in the kernels' order of
        f32 operations (step::Write: the bf16 parameters stored are one device's)

No parameter is gathered whole: per device the temporaries are about 1/N of the group plus
the padding of each class to a multiple of N layers. Pad layers carry a non-finite gradient,
so the kernel skips them (no work, zero output); they go where the other classes gave the
most work. Everything is collectives and indexing by
the device index (no conditional, so no host sync on GPU).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _ffi
from ._rules import group_ratios


def input_mesh(arrays):
    """The mesh the arrays, (leaf name, what, array), are laid out on if one has several devices
    (None otherwise). Inside jit each traced array's type carries its input's mesh, automatic or
    explicit axes alike; outside, a concrete array's NamedSharding does. Arrays on different
    meshes (axes, sizes, axis types, devices where known) are refused, naming both."""
    found = None
    for leaf, what, x in arrays:
        name = f"'{leaf}' ({what})"
        if isinstance(x, jax.core.Tracer) or not hasattr(x, "sharding"):
            typeof = getattr(jax, "typeof", None)
            sharding = getattr(typeof(x), "sharding", None) if typeof is not None else None
        else:
            sharding = x.sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or mesh.size < 2:
            continue
        if found is None:
            found = (name, mesh)
        elif not same_mesh(mesh, found[1]):
            raise ValueError(f"lanton: leaf {name} is laid out on a mesh {dict(mesh.shape)}, but leaf {found[0]} on "
                             f"{dict(found[1].shape)}; pass lanton(..., mesh=...) to choose the one to divide work over")
    return None if found is None else found[1]


def same_mesh(a, b):
    abstract = lambda m: getattr(m, "abstract_mesh", m)
    ids = lambda m: getattr(m, "device_ids", None) if isinstance(m, jax.sharding.Mesh) else None
    return abstract(a) == abstract(b) and (ids(a) is None or ids(b) is None or np.array_equal(ids(a), ids(b)))


def check_mesh(mesh, axes):
    """Validates lanton(mesh=, mesh_axes=). None: follow the inputs' mesh; False: never divide."""
    if mesh is None or mesh is False:
        if axes is not None:
            raise ValueError("lanton option 'mesh_axes' needs a 'mesh'")
        return mesh, None
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"lanton option 'mesh' must be a jax.sharding.Mesh or AbstractMesh, None or False, "
                        f"got {type(mesh).__name__}")
    axes = tuple(mesh.axis_names) if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or not axes:
        raise ValueError(f"lanton option 'mesh_axes': {unknown or axes} not among the mesh's axes {mesh.axis_names}")
    return mesh, axes


# How a leaf enters the shard_map: cut on its layers, its rows or its columns (of the (L, R, C)
# view), or whole.
LAYERS, ROWS, COLS, WHOLE = "layers", "rows", "cols", "whole"


def _cut(shape, batch_axes, row_axes, rows_are_input, devices, layers_first):
    """(how, array axis) for a leaf of `shape` whose row-major view is (L, R, C): `batch_axes`
    leading layer axes, then `row_axes` row axes, then the columns. The first axis of a group
    (layers, then d_in, then d_out; layers last with `layers_first` off) whose size `devices`
    divides: a device's shard is then one contiguous run of that group."""
    first = {LAYERS: 0 if batch_axes else None, ROWS: batch_axes if row_axes else None,
             COLS: batch_axes + row_axes if batch_axes + row_axes < len(shape) else None}
    order = (ROWS, COLS) if rows_are_input else (COLS, ROWS)
    order = (LAYERS,) + order if layers_first else order + (LAYERS,)
    for how in order:
        axis = first[how]
        if axis is not None and shape[axis] > 0 and shape[axis] % devices == 0:
            return how, axis
    return WHOLE, None


@dataclasses.dataclass
class _Bucket:
    """Layers of one shape class and one cut, stacked for the exchange (or one layer-cut leaf)."""
    how: str
    rows_are_input: bool
    leaves: list  # indices into the group's leaves
    layers: int = 0  # before padding
    cost: int = 0  # of one layer's direction
    # Padded stack (exchanged buckets): row s holds real layer source[s], or a pad where
    # source[s] == layers; real layer i lies in row slots[i].
    source: np.ndarray = None
    slots: np.ndarray = None


def split_group_step(mesh, axes, config, hyper, count, args, names, phases, *, in_place):
    """One group step divided over the devices of `axes` (see the module docstring). `args` as
    for `_ffi.group_step`, plus per leaf its numbers of leading layer axes and of row axes:
    (param, grad, momentum, prev_grad, noise, valid, prev_step, rows_are_input, (L, R, C),
    batch_axes, row_axes); `phases` every layer's noise phase in leaf order (dealt with its
    layer, so the schedule is one device's).
    Returns per leaf (out, momentum, prev_grad, noise, valid, prev_step, ratio) like
    `_ffi.group_step`, each laid out like the input it comes from."""
    devices = int(np.prod([mesh.shape[a] for a in axes]))
    ax = tuple(axes) if len(axes) > 1 else axes[0]
    # On a mesh of several axes a stacked leaf is cut on d_in or d_out: XLA reshards a 2-D
    # layout into that with one all_to_all, into a layer cut only through the whole array.
    cuts = [_cut(a[0].shape, a[9], a[10], a[7], devices, layers_first=len(axes) == 1) for a in args]
    buckets = _buckets(args, cuts)
    _place(buckets, devices)

    def spec(x, cut):
        how, axis = cut
        return P() if how == WHOLE else P(*[ax if i == axis else None for i in range(x.ndim)])

    def body(hyper, count, params, bigs, smalls):
        me = jax.lax.axis_index(ax)
        # Per leaf: (grad, momentum, prev_grad) shards as (layers, rows, cols), per-layer state (L,).
        local = []
        for big, small, a, (how, _) in zip(bigs, smalls, args, cuts):
            local.append(([x.reshape(_shard_dims(a[8], how, devices)) for x in big], [x.reshape(-1) for x in small]))
        # Each device's run of every bucket as whole matrices; the kernel over all of them with
        # no rate, decay or ratio (out = s * D): the ratio needs every device's trackers first.
        runs = [_deal(b, local, devices, ax, me) for b in buckets]
        owner_hyper = hyper.at[0].set(-1.0).at[3].set(0.0)
        owner_config = dataclasses.replace(config, ratio_power=0.0, ratio_floor=0.0, ratio_cap=math.inf)
        # The kernel reads X only for the decay, zero here, and only in layers whose gradient is
        # finite: the gradient stands in, in f32, the direction's dtype.
        leaves = [(run[0].astype(jnp.float32), *run[:6], b.rows_are_input, run[0].shape) for b, run in zip(buckets, runs)]
        outs = _ffi.group_step(owner_config, owner_hyper, count, leaves,
                               ["+".join(names[i] for i in b.leaves) for b in buckets], in_place=False,
                               phases=jnp.concatenate([run[6] for run in runs]))
        per_leaf = {}
        for b, o in zip(buckets, outs):
            per_leaf.update(zip(b.leaves, _collect(b, o, [args[i][8][0] for i in b.leaves], devices, ax)))
        per_leaf = [per_leaf[i] for i in range(len(args))]
        # The group's ratios from every layer's tracker, as one device forms them (in f32).
        noise = jnp.concatenate([o[3] for o in per_leaf])
        valid = jnp.concatenate([o[4] for o in per_leaf])
        ratios = (group_ratios(noise, valid > 0.5, config.ratio_stat, config.ratio_eps, config.ratio_power,
                               config.ratio_floor, config.resolved_ratio_cap())
                  if config.noise_adaptive else jnp.ones_like(noise))
        lr, wd = hyper[0], hyper[3]
        results, start = [], 0
        for p, big, small, ((g, *_), _), (d, mom, prev, noise, valid, pstep), a, (how, _) in zip(
                params, bigs, smalls, local, per_leaf, args, cuts):
            L = a[8][0]
            r = ratios[start:start + L]
            start += L
            # A layer with a non-finite gradient (anywhere in it) gets no update at all.
            bad = jnp.sum(~jnp.isfinite(g), axis=(1, 2))
            if how in (ROWS, COLS):
                bad = jax.lax.psum(bad, ax)
            r_here = jax.lax.dynamic_slice_in_dim(r, me * (L // devices), L // devices) if how == LAYERS else r
            x = p.reshape(g.shape).astype(jnp.float32)
            ok = (bad == 0)[:, None, None]
            # d = s * D from the owner; then the kernels' order (step::Write), so the f32
            # rounding, and the bf16 parameters stored, are one device's.
            delta = jnp.where(ok, -lr * (wd * x + r_here[:, None, None] * d), 0.0)
            out = jnp.where(ok, x + delta, x) if in_place else delta
            results.append((out.astype(p.dtype).reshape(p.shape), mom.reshape(big[1].shape), prev.reshape(big[2].shape),
                            *(y.reshape(s.shape) for y, s in zip((noise, valid, pstep), small)), r.reshape(small[0].shape)))
        return results

    params = [a[0] for a in args]
    bigs = [list(a[1:4]) for a in args]
    starts = np.cumsum([0] + [a[8][0] for a in args])
    leaf_phases = [jnp.asarray(np.asarray(phases)[starts[i]:starts[i + 1]], jnp.int32) for i in range(len(args))]
    smalls = [list(a[4:7]) + [ph] for a, ph in zip(args, leaf_phases)]
    big_specs = [[spec(x, c) for x in big] for big, c in zip(bigs, cuts)]
    param_specs = [spec(p, c) for p, c in zip(params, cuts)]
    in_specs = (P(), P(), param_specs, big_specs, [[P()] * 4 for _ in args])
    out_specs = [((ps,) + tuple(bs[1:]) + (P(),) * 4) for ps, bs in zip(param_specs, big_specs)]
    # A mesh with explicit axes types every array with its sharding: the operands are laid out
    # as the shard_map takes them, and the results given their inputs' layout back (an automatic
    # mesh does both itself).
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if explicit and not any(_typed_on_a_mesh(a[0]) or _typed_on_a_mesh(a[1]) for a in args):
        # Inputs laid out on no mesh (lanton(mesh=) given for arrays that are not on it): divide
        # the work over the mesh's devices as an automatic mesh, so that no explicit layout
        # leaks into the caller's arrays (a Flax conv refuses explicitly sharded operands).
        mesh = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
        explicit = False
    put = (lambda x, s: jax.sharding.reshard(x, NamedSharding(mesh, s))) if explicit else (lambda x, s: x)
    inputs = (put(hyper, P()), put(count, P()), [put(p, s) for p, s in zip(params, param_specs)],
              [[put(x, s) for x, s in zip(b, bs)] for b, bs in zip(bigs, big_specs)],
              [[put(x, P()) for x in s] for s in smalls])
    # check_vma off: the per-layer results are equal on every device (all-gathered, or formed
    # from all-gathered values), which the type system cannot see through the kernel call.
    outs = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*inputs)
    if not explicit:
        return outs
    # (update, momentum, prev_grad, noise, valid, prev_step, ratio) take the layout of
    # (grad or the param in place, momentum, prev_grad, noise, valid, prev_step, noise); an input
    # made outside the mesh, e.g. by init() without a sharding, has none to take.
    like = lambda a: (a[0] if in_place else a[1], a[2], a[3], a[4], a[5], a[6], a[4])
    back = lambda y, s: jax.sharding.reshard(y, s) if s.mesh.axis_names else y
    return [tuple(back(y, jax.typeof(x).sharding) for y, x in zip(o, like(a))) for o, a in zip(outs, args)]


def _typed_on_a_mesh(x) -> bool:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return bool(mesh is not None and not mesh.empty and mesh.axis_names)


def _shard_dims(dims, how, devices):
    L, R, C = dims
    return {LAYERS: (L // devices, R, C), ROWS: (L, R // devices, C), COLS: (L, R, C // devices), WHOLE: (L, R, C)}[how]


def _buckets(args, cuts):
    """Leaves grouped for the exchange: one bucket per (cut, shape class, orientation, dtypes),
    one per layer-cut leaf (its shards are whole layers already)."""
    out, index = [], {}
    for i, (a, (how, _)) in enumerate(zip(args, cuts)):
        L, R, C = a[8]
        cost = R * C * max(min(R, C), 1)
        if how == LAYERS:
            out.append(_Bucket(how, a[7], [i], L, cost))
            continue
        key = (how, R, C, a[7], a[1].dtype, a[2].dtype, a[3].dtype)
        if key not in index:
            index[key] = len(out)
            out.append(_Bucket(how, a[7], [], 0, cost))
        b = out[index[key]]
        b.leaves.append(i)
        b.layers += L
    return out


def _place(buckets, devices):
    """Where the pad layers go: a bucket of n layers is padded to k N (k = ceil(n / N)), each
    device's run being k rows with at most one pad; the pads go to the devices with the most
    work so far (most expensive buckets first), so that e.g. 4 MLP-in and 4 MLP-out matrices on
    8 devices land on 8 different devices."""
    load = np.zeros(devices)
    for b in buckets:
        if b.how == LAYERS:
            load += b.cost * (b.layers // devices)
    for b in sorted((b for b in buckets if b.how != LAYERS), key=lambda b: -b.cost):
        k = -(-b.layers // devices)
        pads = k * devices - b.layers
        padded = set(np.argsort(-load, kind="stable")[:pads].tolist())
        source, real = [], 0
        for d in range(devices):
            mine = k - (d in padded)
            source += list(range(real, real + mine)) + [b.layers] * (k - mine)
            real += mine
            load[d] += mine * b.cost
        b.source = np.asarray(source)
        b.slots = np.flatnonzero(b.source < b.layers)


def _deal(b, local, devices, ax, me):
    """This device's run of bucket `b`: (grad, momentum, prev_grad) as whole (k, R, C)
    matrices and (noise, valid, prev_step, phase) of k layers. The bucket's layers are stacked and
    padded (`_place`) with layers whose gradient is NaN (the kernel skips them); device i's run
    is rows [i k, (i + 1) k) of the padded stack."""
    if b.how == LAYERS:
        (big, small), = [local[i] for i in b.leaves]
        k = big[0].shape[0]
        return (*big, *(jax.lax.dynamic_slice_in_dim(s, me * k, k) for s in small))
    k = len(b.source) // devices

    def stack(xs, fill):
        if len(b.source) == b.layers:  # no pads: the rows in order
            return jnp.concatenate(xs) if len(xs) > 1 else xs[0]
        return jnp.concatenate(xs + [jnp.full((1,) + xs[0].shape[1:], fill, xs[0].dtype)])[b.source]

    big = [stack([local[i][0][j] for i in b.leaves], np.nan if j == 0 else 0) for j in range(3)]
    small = [stack([local[i][1][j] for i in b.leaves], 0) for j in range(len(local[b.leaves[0]][1]))]
    if b.how == WHOLE:
        big = [jax.lax.dynamic_slice_in_dim(x, me * k, k) for x in big]
    else:  # shards of every layer -> whole layers of this device's run
        big = [jax.lax.all_to_all(x, ax, 0, 1 if b.how == ROWS else 2, tiled=True) for x in big]
    return (*big, *(jax.lax.dynamic_slice_in_dim(s, me * k, k) for s in small))


def _collect(b, outs, layers, devices, ax):
    """The kernel's results for this device's run of bucket `b` back to the leaves: (direction,
    momentum, prev_grad) as the leaves' shards, (noise, valid, prev_step) of every layer."""
    d, mom, prev, noise, valid, pstep, _ = outs
    small = [jax.lax.all_gather(s, ax, axis=0, tiled=True) for s in (noise, valid, pstep)]
    if b.how == LAYERS:
        return [(d, mom, prev, *small)]
    if b.how == WHOLE:
        big = [jax.lax.all_gather(x, ax, axis=0, tiled=True) for x in (d, mom, prev)]
    else:
        big = [jax.lax.all_to_all(x, ax, 1 if b.how == ROWS else 2, 0, tiled=True) for x in (d, mom, prev)]
    if len(b.source) != b.layers:
        big, small = [x[b.slots] for x in big], [x[b.slots] for x in small]
    out, start = [], 0
    for n in layers:
        out.append(tuple(x[start:start + n] for x in big + small))
        start += n
    return out
