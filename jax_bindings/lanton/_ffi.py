"""Finds and loads liblanton with ctypes, registers its XLA FFI targets, and builds the call.

Search order for the library: $LANTON_LIBRARY, the copy bundled in this package (lanton/_lib),
then a development build in the crate's target/release.

The library must match this package: same C ABI version and the same release version (a stale
build from an older checkout is refused with the command that rebuilds it). XLA keeps one handler
per target name per process, so the targets are registered once per process: the record of it
lives in a module of its own (`_lanton_ffi_registry` in sys.modules) that survives a reload or a
second import of this package; loading again returns the library already registered.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import threading
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ._plan import noise_phases

ABI_VERSION = 9  # must equal LANTON_ABI_VERSION in src/capi.rs
# The handlers report XLA FFI API 0.3 (src/ffi/api.rs); jaxlib accepts it from 0.10.0 on. Older
# jaxlib refuses the registration when its CPU backend starts, which breaks every computation of
# the process, so the loader refuses first.
MIN_JAXLIB = (0, 10, 0)
_LIB_NAME = "liblanton.dylib" if sys.platform == "darwin" else "liblanton.so"
# target name -> exported handler symbol, per XLA platform
_TARGETS = {
    "cpu": {"lanton_step_update": "lanton_step_update_cpu", "lanton_step_inplace": "lanton_step_inplace_cpu"},
    "CUDA": {"lanton_step_update": "lanton_step_update_cuda", "lanton_step_inplace": "lanton_step_inplace_cuda"},
}
# jax backend name -> XLA platform of the targets
_BACKENDS = {"cpu": "cpu", "gpu": "CUDA", "cuda": "CUDA"}
_REBUILD = (
    "Rebuild it: `pip install ./jax_bindings` from the lanton checkout (builds and bundles the "
    "library with cargo), or `cargo build --release` there and point LANTON_LIBRARY at "
    "target/release/" + _LIB_NAME + "."
)
_REGISTRY_NAME = "_lanton_ffi_registry"

# This module's cache: the loaded library and its path, or the error that stopped loading.
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


def package_version() -> str:
    """The version of this lanton package (lanton.__version__, which pyproject.toml reads)."""
    from . import __version__

    return __version__


def load_library() -> ctypes.CDLL:
    """Loads the library once and registers its targets for every platform it supports.

    Thread-safe; every call (from any thread, a reloaded module or a second import of the
    package) returns the library whose handlers XLA holds."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        if "error" in _state:
            raise LibraryError(_state["error"])
        try:
            lib, path = _load_and_register()
        except LibraryError as e:
            _state["error"] = str(e)
            raise
        _state["path"] = path
        _state["lib"] = lib
        return lib


def _registry() -> types.ModuleType:
    """The process-wide record of the registration (dict.setdefault is atomic under the GIL)."""
    reg = sys.modules.setdefault(_REGISTRY_NAME, types.ModuleType(_REGISTRY_NAME, "lanton's XLA FFI targets"))
    reg.__dict__.setdefault("lock", threading.Lock())
    reg.__dict__.setdefault("registered", None)  # (path, CDLL) once the targets are registered
    return reg


def _find() -> Path:
    tried = candidate_paths()
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise LibraryError(
            "liblanton not found; looked in: " + ", ".join(map(str, tried))
            + ". Install the package with `pip install ./jax_bindings` (builds it with cargo) "
            "or point LANTON_LIBRARY at a built liblanton.so."
        )
    return path


def _open_checked(path: Path) -> ctypes.CDLL:
    """Loads the library and checks that it is a lanton build matching this package."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LibraryError(f"cannot load {path}: {e}") from e
    return _check(lib, path)


def _check(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    if not hasattr(lib, "lanton_abi_version") or not hasattr(lib, "lanton_version"):
        raise LibraryError(f"{path} is not a lanton library (no lanton_abi_version/lanton_version)")
    lib.lanton_abi_version.restype = ctypes.c_uint32
    lib.lanton_version.restype = ctypes.c_char_p
    pkg = package_version()
    found_abi = lib.lanton_abi_version()
    found = (lib.lanton_version() or b"?").decode(errors="replace")
    if found_abi != ABI_VERSION:
        raise LibraryError(
            f"{path} is liblanton {found} with C ABI version {found_abi}, but this lanton package "
            f"({pkg}) needs ABI version {ABI_VERSION}. {_REBUILD}"
        )
    if found != pkg:
        raise LibraryError(
            f"{path} is liblanton {found}, but this lanton package is {pkg}: the library is stale "
            f"(or newer than the package). {_REBUILD}"
        )
    for targets in _TARGETS.values():
        for symbol in targets.values():
            if not hasattr(lib, symbol):
                raise LibraryError(f"{path} lacks the handler {symbol}; it is too old for this package. {_REBUILD}")
    if not hasattr(lib, "lanton_cuda_scratch_bytes"):
        raise LibraryError(f"{path} lacks lanton_cuda_scratch_bytes; it is too old for this package. {_REBUILD}")
    return lib


def _jaxlib_version() -> tuple[int, ...]:
    from jax import lib as jax_lib

    return tuple(int(x) for x in re.findall(r"\d+", jax_lib.__version__)[:3])


def _register(lib: ctypes.CDLL, path: Path) -> None:
    found = _jaxlib_version()
    if found < MIN_JAXLIB:
        raise LibraryError(
            f"jaxlib {'.'.join(map(str, found))} is too old for liblanton ({path}): its XLA FFI "
            f"handlers need jaxlib >= {'.'.join(map(str, MIN_JAXLIB))} (FFI API 0.3); nothing was "
            f"registered. Upgrade with `pip install -U 'jax>=0.10' 'jaxlib>=0.10'`."
        )
    for platform, targets in _TARGETS.items():
        for name, symbol in targets.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            # CUDA handlers also run at XLA's initialize stage (kernel compilation and the cuBLAS
            # handle must not happen while a CUDA graph is being captured).
            handler = {"initialize": capsule, "execute": capsule} if platform == "CUDA" else capsule
            try:
                jax.ffi.register_ffi_target(name, handler, platform=platform)
            except Exception as e:  # XLA refuses, e.g. another library holds the name already
                raise LibraryError(f"registering {name} ({platform}) from {path} with XLA failed: {e}") from e


def _load_and_register() -> tuple[ctypes.CDLL, Path]:
    path = _find()
    reg = _registry()
    with reg.lock:
        if reg.registered is not None:
            first_path, first_lib = reg.registered
            if not _same_file(first_path, path):
                warnings.warn(
                    f"lanton: this process registered its XLA targets from {first_path} already; "
                    f"{path} is not loaded (XLA keeps one handler per target; restart the process "
                    "to use another library)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _check(first_lib, first_path)  # still matches this (possibly reloaded) package
            return first_lib, first_path
        lib = _open_checked(path)
        _register(lib, path)
        reg.registered = (path, lib)
        return lib, path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def available() -> bool:
    """True if the library loads and has a target for the default JAX backend."""
    try:
        load_library()
    except LibraryError:
        return False
    return _BACKENDS.get(jax.default_backend()) in _TARGETS


def environment_problem():
    """The library's own check of the environment it reads (LANTON_NUM_THREADS): None if fine,
    else its message. None too when the library cannot be loaded (nothing of it will run)."""
    try:
        lib = load_library()
    except LibraryError:
        return None
    fn = getattr(lib, "lanton_check_env", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    buf = ctypes.create_string_buffer(512)
    if fn(buf, len(buf)) == 0:
        return None
    return buf.value.decode(errors="replace") or "invalid environment for liblanton"


def library_info() -> dict:
    """Where the library XLA runs was loaded from, its version and C ABI version."""
    lib = load_library()
    return {"path": str(_state["path"]), "version": lib.lanton_version().decode(), "abi": ABI_VERSION}


ARGS_PER_LEAF = 8
RETS_PER_LEAF = 8


@functools.lru_cache(maxsize=512)
def cuda_scratch_bytes(kind: str, noise_adaptive: bool, noise_work: bool, ns_dtype: str, dims: tuple) -> int:
    """Bytes of the scratch result a CUDA call of the group needs, from the library's own plan
    (lanton_cuda_scratch_bytes, the function its handler lays the scratch out with). `dims`
    holds (L, R, C) per leaf in call order. Cached: the answer depends on nothing else."""
    lib = load_library()
    fn = lib.lanton_cuda_scratch_bytes
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p, ctypes.c_size_t]
    plan = json.dumps({"kind": kind, "noise_adaptive": bool(noise_adaptive), "noise_work": bool(noise_work),
                       "ns_dtype": ns_dtype, "leaves": [[int(x) for x in d] for d in dims]})
    out, err = ctypes.c_uint64(0), ctypes.create_string_buffer(512)
    if fn(plan.encode(), ctypes.byref(out), err, len(err)) != 0:
        raise ValueError(f"lanton: no CUDA scratch size for the {kind} group: {err.value.decode(errors='replace')}")
    return int(out.value)


def newton_schulz_runs() -> int:
    """Newton-Schulz directions (one per matrix) the CPU kernels computed in this process."""
    lib = load_library()
    lib.lanton_newton_schulz_runs.restype = ctypes.c_uint64
    return int(lib.lanton_newton_schulz_runs())


def group_step(config, hyper, t, leaves, names, *, in_place: bool, phases=None, skipped=None):
    """One fused FFI call for a whole group. `phases`: every layer's noise phase, int32, in leaf
    order (default: the phases of `config.noise_schedule`, `_plan.noise_phases`; none passed for
    the synchronous schedule, whose phases are all 0 by definition). `leaves` holds per leaf the tuple
    (param, grad, momentum, prev_grad, noise, valid, prev_step, rows_are_input, (L, R, C)):
    param, grad, momentum and prev_grad of one shape whose row-major order is (layers, rows,
    cols) = (L, R, C), the per-layer state of L elements in any shape. The arrays go to the
    kernel in their own shapes (a reshape of a donated buffer would make XLA copy it in and
    out); `layer_dims` tells it (L, R, C). Returns per leaf (out, momentum, prev_grad, noise,
    valid, prev_step, ratio), each shaped like its input (ratio like noise), and with `skipped`
    (per leaf, int32 like prev_step: the steps each layer was skipped for a non-finite gradient)
    that count after this step as an eighth entry: the kernels count it, no pass of the shim's
    own over the gradients. Without it the call counts from zero and drops the count.

    On CUDA the call has one more result, uint8[bytes]: the step's scratch (cuBLAS workspace,
    accumulators, Newton-Schulz buffers), sized by `cuda_scratch_bytes`. The handler allocates
    nothing, so a CUDA graph that records the call replays it into memory XLA owns. The
    scratch is dropped here; the CPU call has no such result."""
    load_library()
    args, out_types, aliases = [hyper, t], [], {}
    counts = [jnp.zeros(lf[6].shape, jnp.int32) for lf in leaves] if skipped is None else skipped
    for i, ((param, grad, mom, prev, noise, valid, pstep, _rows_in, _dims), count) in enumerate(zip(leaves, counts)):
        args += [param, grad, mom, prev, noise, valid, pstep, count]
        base_a, base_r = 2 + ARGS_PER_LEAF * i, RETS_PER_LEAF * i
        out_types += [
            jax.ShapeDtypeStruct(param.shape, param.dtype),
            jax.ShapeDtypeStruct(mom.shape, mom.dtype),
            jax.ShapeDtypeStruct(prev.shape, prev.dtype),
            jax.ShapeDtypeStruct(noise.shape, noise.dtype),
            jax.ShapeDtypeStruct(valid.shape, valid.dtype),
            jax.ShapeDtypeStruct(pstep.shape, pstep.dtype),
            jax.ShapeDtypeStruct(noise.shape, noise.dtype),
            jax.ShapeDtypeStruct(count.shape, jnp.int32),
        ]
        # State flows through in place; with donation XLA reuses the buffers. An adam group's
        # tracker inputs (noise, valid, prev_step) are constants, not state (lanton._state
        # ADAM_FIELDS): aliased, XLA would copy each into a buffer of its own first.
        pairs = ((2, 1), (3, 2), (7, 7)) if config.kind == "adam" else ((2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 7))
        for a, r in pairs:
            aliases[base_a + a] = base_r + r
        if in_place:
            aliases[base_a] = base_r
    # The phases go as data (the split deals them with their layers). A synchronous call leaves
    # them out, its phases being all 0, which the library takes without them (and XLA need not
    # materialize a constant of zeros: one more fusion per group).
    schedule = config.noise_schedule
    if schedule != "synchronous":
        if phases is None:
            phases = noise_phases(schedule, config.noise_every, [lf[8] for lf in leaves])
        if isinstance(phases, np.ndarray) and not phases.any():
            schedule = "synchronous"  # e.g. a group of one layer per shape: the same step, no constant
        else:
            args.append(jnp.asarray(phases, jnp.int32))
    target = "lanton_step_inplace" if in_place else "lanton_step_update"
    call = jax.ffi.ffi_call(target, out_types, input_output_aliases=aliases, vmap_method="sequential")
    attrs = dict(
        kind=config.kind,
        ns_coeffs=np.asarray(config.ns_coeffs, np.float32).reshape(-1),
        noise_every=int(config.noise_every),
        noise_schedule=schedule,
        noise_adaptive=bool(config.noise_adaptive),
        ratio_stat=config.ratio_stat,
        ratio_eps=np.float32(config.ratio_eps),
        ratio_power=np.float32(config.ratio_power),
        ratio_floor=np.float32(config.ratio_floor),
        ratio_cap=np.float32(config.resolved_ratio_cap()),
        noise_relative=bool(config.noise_relative),
        nesterov=bool(config.nesterov),
        vector_eps=np.float32(config.vector_eps),
        adam_eps=np.float32(config.adam_eps),
        adam_eps_root=np.float32(config.adam_eps_root),
        rows_are_input=np.asarray([lf[7] for lf in leaves], np.uint8),
        layer_dims=np.asarray([d for lf in leaves for d in lf[8]], np.int64),
        leaf_names="\n".join(names),
        ns_dtype=config.ns_dtype,
        noise_estimator=config.noise_estimator,
    )
    dims = tuple(tuple(int(x) for x in lf[8]) for lf in leaves)

    def cuda(*a):
        # Every step makes the same call: the hidden group's noise work (polar iterations) is
        # enqueued always and its kernels read the step count on the device, returning at once
        # on steps that do not refresh the tracker (no conditional: on GPU XLA would copy its
        # predicate to the host and wait for the device every step).
        nbytes = cuda_scratch_bytes(config.kind, bool(config.noise_adaptive), True, config.ns_dtype, dims)
        scratch = jax.ShapeDtypeStruct((nbytes,), np.uint8)
        with_scratch = jax.ffi.ffi_call(target, out_types + [scratch], input_output_aliases=aliases,
                                        vmap_method="sequential")
        return list(with_scratch(*a, **attrs))[:-1]  # the scratch stays inside the step

    outs = jax.lax.platform_dependent(*args, cpu=lambda *a: list(call(*a, **attrs)), default=cuda)
    keep = RETS_PER_LEAF if skipped is not None else RETS_PER_LEAF - 1
    return [tuple(outs[RETS_PER_LEAF * i: RETS_PER_LEAF * i + keep]) for i in range(len(leaves))]
