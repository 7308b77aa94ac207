"""The contenders of the benchmarks, configured as ../shared/BENCHMARKS.md asks."""

from __future__ import annotations

import jax
import optax

import lanton
from gpt import schedule


def hidden_only_dims(params):
    """optax Muon's fair configuration: Newton-Schulz for hidden matrices only."""
    labels = lanton.default_labels(params)
    return jax.tree.map(lambda l: optax.contrib.MuonDimensionNumbers(0, 1) if l == "hidden" else None, labels)


def muon_adam_part(lr):
    """optax Muon's Adam branch as it runs for the non-hidden leaves (BENCHMARKS.md: NAdamW, b1 0.9,
    b2 0.999, no weight decay)."""
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, nesterov=True)


def hybrid(learning_rate, adam_learning_rate, **lanton_kw):
    """lanton on the hidden matrices, optax Muon's Adam branch on the rest: the exact counterpart
    of optax Muon's hidden-only configuration, so a comparison isolates the noise-adaptive rate."""

    def kinds(params):
        return lanton.default_labels(params)

    def part(params):
        return jax.tree.map(lambda k: "lanton" if k == "hidden" else "adam", kinds(params))

    hidden_only = lambda params: jax.tree.map(lambda k: k if k == "hidden" else None, kinds(params))
    return optax.multi_transform(
        {"lanton": lanton.lanton(learning_rate, labels=hidden_only, **lanton_kw), "adam": muon_adam_part(adam_learning_rate)},
        part, mask_compatible_extra_args=True)  # Option II's second_grad is masked like the updates


def make(name, lr, adam_lr=3e-3, **lanton_kw):
    """Returns steps -> GradientTransformation for one contender."""
    if name in ("lanton", "lanton_noise_off"):
        kw = dict(lanton_kw)
        if name == "lanton_noise_off":
            kw["noise_adaptive"] = False
        # The Adam part at adam_lr whatever the hidden rate (default: 0.4 x it, lanton's rule).
        fixed_adam = kw.pop("adam_lr_fixed", False)
        return lambda steps: lanton.lanton(learning_rate=schedule(lr, steps), **kw,
                                           **({"adam_learning_rate": schedule(adam_lr, steps)} if fixed_adam else {}))
    if name == "hybrid":
        return lambda steps: hybrid(schedule(lr, steps), schedule(adam_lr, steps), **lanton_kw)
    if name == "muon":
        return lambda steps: optax.contrib.muon(
            learning_rate=schedule(lr, steps), adam_learning_rate=schedule(adam_lr, steps),
            muon_weight_dimension_numbers=hidden_only_dims)
    if name == "muon_default":
        return lambda steps: optax.contrib.muon(learning_rate=schedule(lr, steps), adam_learning_rate=schedule(adam_lr, steps))
    if name == "adamw":
        return lambda steps: optax.adamw(schedule(lr, steps), b2=0.95, weight_decay=0.1)
    raise ValueError(f"unknown optimizer {name!r}")


# Rates for runs without a sweep: lanton's default (median reference); noise-off lanton's best at 500 steps (0.015; at
# 1500 steps 0.0075, benches/results/quality*), r = 1 wants a smaller step than lanton's least noisy layer.
DEFAULT_LR = {"lanton": 0.0075, "lanton_noise_off": 0.015, "muon": 0.02, "muon_default": 0.02, "adamw": 3e-3}
