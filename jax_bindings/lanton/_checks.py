"""Construction-time checks of lanton's options: a bad value is refused by name, with its range.

Only concrete values can be checked. A traced value (a hyperparameter injected by
`optax.inject_hyperparams` under `jit`, or a schedule's output) is the caller's responsibility:
it reaches the kernels as it is.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def concrete(value):
    """The value as a NumPy array, or None when it is traced (cannot be checked)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # e.g. an abstract value
        return None


def real(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False, what="option"):
    """Checks a real scalar: finite and within [lo, hi] (bounds open where said). Returns it."""
    arr = concrete(value)
    if arr is None:
        return value
    if arr.shape != () or arr.dtype.kind not in "biuf" or arr.dtype == np.bool_:
        raise TypeError(f"lanton {what} '{name}' must be a real number, got {value!r}")
    x = float(arr)
    lo_ok = lo is None or (x > lo if lo_open else x >= lo)
    hi_ok = hi is None or (x < hi if hi_open else x <= hi)
    if not math.isfinite(x) or not lo_ok or not hi_ok:
        left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        raise ValueError(f"lanton {what} '{name}' must be finite and in {left}, {right}, got {value!r}")
    return value


def positive_int(name, value, what="option"):
    """An integer >= 1 (an integral float such as 10.0 is accepted; 2.7, True or 0 are not)."""
    arr = concrete(value)
    if arr is None:
        raise TypeError(f"lanton {what} '{name}' is structural and must be a concrete integer, got a traced value")
    ok = arr.shape == () and arr.dtype != np.bool_ and arr.dtype.kind in "iuf" and math.isfinite(float(arr))
    if not ok or float(arr) != int(arr) or int(arr) < 1:
        raise ValueError(f"lanton {what} '{name}' must be an integer >= 1, got {value!r}")
    return int(arr)


def ns_coeffs(value):
    """Newton-Schulz coefficients: a non-empty sequence of finite (a, b, c) triples."""
    try:
        triples = tuple(tuple(float(c) for c in t) for t in value)
    except (TypeError, ValueError):
        raise ValueError(f"lanton option 'ns_coeffs' must be a sequence of (a, b, c) triples of numbers, got {value!r}") from None
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"lanton option 'ns_coeffs' must be a non-empty sequence of (a, b, c) triples, got {value!r}")
    if not all(math.isfinite(c) for t in triples for c in t):
        raise ValueError(f"lanton option 'ns_coeffs' must be finite, got {value!r}")
    return triples


def learning_rate(value, name="learning_rate"):
    if callable(value):
        return value  # a schedule: its values are traced
    return real(name, value, lo=0.0)

