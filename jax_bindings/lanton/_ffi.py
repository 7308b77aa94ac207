"""Finds and loads liblanton with ctypes, registers its XLA FFI targets, and builds the call.

Search order for the library: $LANTON_LIBRARY, the copy bundled in this package (lanton/_lib),
then a development build in the crate's target/release.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

import jax
import numpy as np

ABI_VERSION = 1  # must equal LANTON_ABI_VERSION in src/capi.rs
_LIB_NAME = "liblanton.dylib" if sys.platform == "darwin" else "liblanton.so"
# target name -> exported handler symbol, per XLA platform
_TARGETS = {
    "cpu": {"lanton_step_update": "lanton_step_update_cpu", "lanton_step_inplace": "lanton_step_inplace_cpu"},
    "CUDA": {"lanton_step_update": "lanton_step_update_cuda", "lanton_step_inplace": "lanton_step_inplace_cuda"},
}
# jax backend name -> XLA platform of the targets
_BACKENDS = {"cpu": "cpu", "gpu": "CUDA", "cuda": "CUDA"}

_lock = threading.Lock()
_state: dict = {}


class LibraryError(RuntimeError):
    """liblanton is missing, too old, or could not be registered with XLA."""


def candidate_paths() -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = []
    if os.environ.get("LANTON_LIBRARY"):
        paths.append(Path(os.environ["LANTON_LIBRARY"]))
    paths.append(here / "_lib" / _LIB_NAME)
    paths.append(here.parent.parent / "target" / "release" / _LIB_NAME)
    return paths


def load_library() -> ctypes.CDLL:
    """Loads the library once and registers its targets for every platform it supports."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        if "error" in _state:
            raise LibraryError(_state["error"])
        try:
            lib = _load_and_register()
        except LibraryError as e:
            _state["error"] = str(e)
            raise
        _state["lib"] = lib
        return lib


def _load_and_register() -> ctypes.CDLL:
    tried = candidate_paths()
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise LibraryError(
            "liblanton not found; looked in: " + ", ".join(map(str, tried))
            + ". Install the package with `pip install ./jax_bindings` (builds it with cargo) "
            "or point LANTON_LIBRARY at a built liblanton.so."
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LibraryError(f"cannot load {path}: {e}") from e
    if not hasattr(lib, "lanton_abi_version"):
        raise LibraryError(f"{path} is not a lanton library (no lanton_abi_version)")
    lib.lanton_abi_version.restype = ctypes.c_uint32
    lib.lanton_version.restype = ctypes.c_char_p
    found = lib.lanton_abi_version()
    if found != ABI_VERSION:
        raise LibraryError(
            f"{path} has ABI version {found}, this package needs {ABI_VERSION}: rebuild the library "
            "(pip install ./jax_bindings) or update LANTON_LIBRARY"
        )
    for platform, targets in _TARGETS.items():
        for name, symbol in targets.items():
            fn = getattr(lib, symbol, None)
            if fn is None:
                raise LibraryError(f"{path} lacks the handler {symbol}; it is too old for this package")
            capsule = jax.ffi.pycapsule(fn)
            # CUDA handlers also run at XLA's initialize stage (kernel compilation and the cuBLAS
            # handle must not happen while a CUDA graph is being captured).
            handler = {"initialize": capsule, "execute": capsule} if platform == "CUDA" else capsule
            jax.ffi.register_ffi_target(name, handler, platform=platform)
    _state["path"] = path
    return lib


def available() -> bool:
    """True if the library loads and has a target for the default JAX backend."""
    try:
        load_library()
    except LibraryError:
        return False
    return _BACKENDS.get(jax.default_backend()) in _TARGETS


def library_info() -> dict:
    lib = load_library()
    return {"path": str(_state["path"]), "version": lib.lanton_version().decode(), "abi": ABI_VERSION}


ARGS_PER_LEAF = 7
RETS_PER_LEAF = 7


def group_step(config, hyper, t, leaves, names, *, in_place: bool):
    """One fused FFI call for a whole group. `leaves` holds per leaf the canonical tuple
    (param, grad, momentum, prev_grad, noise, valid, prev_step) with params (L, R, C).
    Returns per leaf (out, momentum, prev_grad, noise, valid, prev_step, ratio)."""
    load_library()
    args, out_types, aliases = [hyper, t], [], {}
    for i, (param, grad, mom, prev, noise, valid, pstep, _rows_in) in enumerate(leaves):
        args += [param, grad, mom, prev, noise, valid, pstep]
        base_a, base_r = 2 + ARGS_PER_LEAF * i, RETS_PER_LEAF * i
        out_types += [
            jax.ShapeDtypeStruct(param.shape, param.dtype),
            jax.ShapeDtypeStruct(mom.shape, mom.dtype),
            jax.ShapeDtypeStruct(prev.shape, prev.dtype),
            jax.ShapeDtypeStruct(noise.shape, noise.dtype),
            jax.ShapeDtypeStruct(valid.shape, valid.dtype),
            jax.ShapeDtypeStruct(pstep.shape, pstep.dtype),
            jax.ShapeDtypeStruct(noise.shape, noise.dtype),
        ]
        # State flows through in place; with donation XLA reuses the buffers.
        for a, r in ((2, 1), (3, 2), (4, 3), (5, 4), (6, 5)):
            aliases[base_a + a] = base_r + r
        if in_place:
            aliases[base_a] = base_r
    call = jax.ffi.ffi_call(
        "lanton_step_inplace" if in_place else "lanton_step_update",
        out_types,
        input_output_aliases=aliases,
        vmap_method="sequential",
    )
    attrs = dict(
        kind=config.kind,
        ns_coeffs=np.asarray(config.ns_coeffs, np.float32).reshape(-1),
        noise_every=int(config.noise_every),
        noise_adaptive=bool(config.noise_adaptive),
        ratio_stat=config.ratio_stat,
        ratio_eps=np.float32(config.ratio_eps),
        nesterov=bool(config.nesterov),
        vector_eps=np.float32(config.vector_eps),
        rows_are_input=np.asarray([lf[7] for lf in leaves], np.uint8),
        leaf_names="\n".join(names),
        ns_dtype=config.ns_dtype,
    )
    if config.kind == "hidden" and config.noise_adaptive:
        # The hidden group's noise work (polar iterations) is worth skipping on steps that do
        # not refresh the tracker. The CPU handler reads t itself; on CUDA the step count stays
        # on the device, so XLA picks the variant with a conditional.
        def cuda(*a):
            return jax.lax.cond(config.is_noise_step(a[1]), lambda *b: call(*b, noise_work=True, **attrs),
                                lambda *b: call(*b, noise_work=False, **attrs), *a)

        outs = jax.lax.platform_dependent(*args, cpu=lambda *a: call(*a, **attrs), default=cuda)
    else:
        outs = call(*args, **attrs)
    return [tuple(outs[RETS_PER_LEAF * i: RETS_PER_LEAF * (i + 1)]) for i in range(len(leaves))]
