"""`lanton.fused(...)`: the in-place path, parameters and state donated and written by the kernels."""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax

from ._options import ScalarOrSchedule
from ._transform import _make, lanton


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
