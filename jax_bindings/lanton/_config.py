"""Structural configuration of one group's step (compile-time attributes of the custom call)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

KINDS = ("hidden", "embed", "vector", "adam")
# The LMO geometries (src/step Kind): `adam` is elementwise NAdamW, optax.contrib.muon's Adam branch.
LMO_KINDS = ("hidden", "embed", "vector")
RATIO_STATS = ("max", "mean", "min", "median")
# The noise estimate's nuclear norm: each platform's kernels have a default ("auto": Gram
# eigenvalues on CPU, polar iteration on CUDA); "polar" runs everywhere, "eigen" on CPU only.
NOISE_ESTIMATORS = ("auto", "eigen", "polar")
# When layers refresh their noise tracker, once every K steps (src/step/mod.rs NoiseSchedule):
# all on the same steps (the paper's), or a fixed 1/K of each shape class per step.
NOISE_SCHEDULES = ("synchronous", "staggered")
# Keller Jordan's quintic Newton-Schulz coefficients (muon.py), 5 steps.
NS_DEFAULT = (3.4445, -4.7750, 2.0315)
NS_DEFAULT_STEPS = 5
# Polar factor for the nuclear norm (src/step/mod.rs): lift, then the convergent (15, -10, 3)/8.
NUCLEAR_SCHEDULE = (NS_DEFAULT,) * 5 + ((15 / 8, -10 / 8, 3 / 8),) * 2


def default_ratio_cap(stat: str) -> float:
    """The cap on r when none is given (src/step RatioStat::default_cap): 1 for the median (the
    quieter half of the group steps at the base rate), none for the other statistics."""
    return 1.0 if stat == "median" else math.inf


@dataclasses.dataclass(frozen=True)
class StepConfig:
    kind: str
    ns_coeffs: tuple = (NS_DEFAULT,) * NS_DEFAULT_STEPS
    noise_every: int = 10
    # Each layer's noise on its own phase: every step does the same 1/K of the noise work (no
    # burst every K steps). The paper's cadence, every layer on the same steps, is "synchronous"
    # (lanton.paper). Why: docs/decisions.md (benches/results/quality_default_staggered*).
    noise_schedule: str = "staggered"
    noise_adaptive: bool = True
    # The reference of alpha: the group's median (r capped at 1), our default since a fading layer
    # under the paper's max throttled every other (benches/results/quality_other_text).
    ratio_stat: str = "median"
    ratio_eps: float = 1e-30
    # Ratio shaping (our option): r = max(ratio_floor, (alpha/ref)^ratio_power). p = 0.5 won the
    # 3-seed protocol (benches/results/quality); p = 1, r_min = 0 is the paper's rule.
    ratio_power: float = 0.5
    ratio_floor: float = 0.0
    # r <= ratio_cap (inf: no cap); None: the statistic's own (`default_ratio_cap`).
    ratio_cap: Optional[float] = None
    # Noise measured relative to the layer's signal (our option): H tracks the squared
    # noise-to-signal ratio ||G - G_prev|| / ||B|| in the group's dual norm. CPU kernels and the
    # reference only.
    noise_relative: bool = False
    nesterov: bool = False
    vector_eps: float = 1e-8
    # Newton-Schulz operand dtype on CUDA (f32 accumulation either way); the CPU kernels and
    # the reference always compute in f32.
    ns_dtype: str = "bfloat16"
    noise_estimator: str = "auto"
    # The adam kind's D = m / (sqrt(v + eps_root) + eps): optax.contrib.muon's `eps` and
    # `adam_eps_root` (its Adam branch is optax.adamw(eps=eps, eps_root=adam_eps_root)).
    adam_eps: float = 1e-8
    adam_eps_root: float = 0.0

    def __post_init__(self):
        if self.ns_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"ns_dtype must be 'bfloat16' or 'float32', got {self.ns_dtype!r}")
        if self.noise_estimator not in NOISE_ESTIMATORS:
            raise ValueError(f"lanton option 'noise_estimator' must be one of {NOISE_ESTIMATORS}, got {self.noise_estimator!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"lanton option 'noise_schedule' must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "adam" and (self.noise_adaptive or self.noise_relative):
            raise ValueError("an adam group tracks no noise (its ratio is 1): its config needs noise_adaptive=False")
        if self.ratio_stat not in RATIO_STATS:
            raise ValueError(f"unknown ratio_stat {self.ratio_stat!r}; expected one of {RATIO_STATS}")
        cap = self.resolved_ratio_cap()
        if not (cap > 0 and cap >= self.ratio_floor):
            raise ValueError(f"lanton option 'ratio_cap' must be > 0 and >= ratio_floor ({self.ratio_floor}), got {cap}")
        if int(self.noise_every) < 1:
            raise ValueError(f"noise_every must be >= 1, got {self.noise_every}")
        if not self.ns_coeffs or any(len(c) != 3 for c in self.ns_coeffs):
            raise ValueError(f"ns_coeffs must be a non-empty sequence of (a, b, c) triples, got {self.ns_coeffs}")

    def resolved_ratio_cap(self) -> float:
        """The cap the kernels apply: `ratio_cap`, or the statistic's own when it is None."""
        return default_ratio_cap(self.ratio_stat) if self.ratio_cap is None else float(self.ratio_cap)


def adam_config(base: StepConfig, nesterov: bool) -> StepConfig:
    """An adam group's config from the global one: no noise tracking, its own Nesterov setting
    (src/step StepConfig::new(Kind::Adam): noise off, Nesterov on, the defaults of that kind)."""
    return dataclasses.replace(base, kind="adam", noise_adaptive=False, noise_relative=False, nesterov=nesterov)
