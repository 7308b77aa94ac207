"""The loader: refuses a library of another version or ABI (saying what to rebuild) or a jaxlib too
old for the handlers; loading from many threads at once, reloading the module and importing the
package afresh all register the targets once and keep working.

Every case runs in a fresh interpreter: XLA's target registry is per process."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lanton

PKG_PARENT = str(Path(lanton.__file__).resolve().parent.parent)  # the lanton the suite imports

# A small jitted lanton step (hidden, embed and vector groups) with the fused kernels.
STEP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, lanton

    def step(backend="ffi"):
        params = {"w": jnp.arange(32.0).reshape(8, 4) / 32, "embed": jnp.ones((5, 4)), "b": jnp.zeros(4)}
        grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
        tx = lanton.lanton(0.05, backend=backend)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        return {k: np.asarray(v) for k, v in updates.items()}
""")


def run_python(code, tmp_path, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "LANTON_LIBRARY"}
    env["PYTHONPATH"] = PKG_PARENT
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def fake_library(tmp_path, abi, version):
    """A shared library with lanton's version entry points only, built with the C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "fake.c"
    src.write_text(
        "#include <stdint.h>\n"
        f"uint32_t lanton_abi_version(void) {{ return {abi}; }}\n"
        f'const char *lanton_version(void) {{ return "{version}"; }}\n'
    )
    out = tmp_path / "fake" / "liblanton.so"
    out.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


LOAD = (
    "import lanton\n"
    "try:\n    lanton.load_library()\nexcept lanton.LibraryError as e:\n    print('ERR', e)\n"
    "print('available', lanton.kernels_available())\n"
)


def assert_says_how_to_rebuild(message):
    assert "pip install ./jax_bindings" in message, message
    assert "cargo build --release" in message and "LANTON_LIBRARY" in message, message


def test_stale_library_version_is_refused(tmp_path):
    lib = fake_library(tmp_path, abi=lanton._ffi.ABI_VERSION, version="0.0.9")
    out = run_python(LOAD, tmp_path, LANTON_LIBRARY=str(lib))
    msg = out.stdout
    assert "ERR" in msg and "available False" in msg, msg + out.stderr
    assert f"{lib} is liblanton 0.0.9, but this lanton package is {lanton.__version__}" in msg, msg
    assert_says_how_to_rebuild(msg)


def test_other_abi_is_refused(tmp_path):
    lib = fake_library(tmp_path, abi=99, version=lanton.__version__)
    out = run_python(LOAD, tmp_path, LANTON_LIBRARY=str(lib))
    msg = out.stdout
    assert "ERR" in msg and "available False" in msg, msg + out.stderr
    assert f"{lib} is liblanton {lanton.__version__} with C ABI version 99" in msg, msg
    assert f"needs ABI version {lanton._ffi.ABI_VERSION}" in msg, msg
    assert_says_how_to_rebuild(msg)


def test_library_without_handlers_is_refused(tmp_path):
    lib = fake_library(tmp_path, abi=lanton._ffi.ABI_VERSION, version=lanton.__version__)
    out = run_python(LOAD, tmp_path, LANTON_LIBRARY=str(lib))
    assert "lacks the handler lanton_step_update_cpu" in out.stdout, out.stdout + out.stderr
    assert_says_how_to_rebuild(out.stdout)


def test_too_old_jaxlib_is_refused_before_registering(tmp_path):
    """jaxlib < 0.10 would refuse the handlers when its CPU backend starts, breaking every
    computation; the loader refuses first and jax keeps working."""
    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    code = (
        "import jax.numpy as jnp, lanton, lanton._ffi as f\n"
        "f._jaxlib_version = lambda: (0, 9, 2)\n"
        "try:\n    lanton.load_library()\nexcept lanton.LibraryError as e:\n    print('ERR', e)\n"
        "print('sum', float(jnp.ones(3).sum()))\n"
    )
    out = run_python(code, tmp_path)
    assert "ERR jaxlib 0.9.2 is too old for liblanton" in out.stdout, out.stdout + out.stderr
    assert "jaxlib >= 0.10.0" in out.stdout and "sum 3.0" in out.stdout, out.stdout + out.stderr


def test_loading_from_many_threads_at_once(tmp_path):
    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    code = STEP + textwrap.dedent("""
        import threading
        n = 8
        barrier = threading.Barrier(n)
        libs, results, errors = [None] * n, [None] * n, []

        def work(i):
            try:
                barrier.wait()
                libs[i] = lanton.load_library()
                results[i] = step()
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        assert all(lib is libs[0] for lib in libs), libs
        for r in results[1:]:
            for k in r: np.testing.assert_array_equal(r[k], results[0][k])
        ref = step("reference")
        for k in ref: np.testing.assert_allclose(results[0][k], ref[k], rtol=2e-4, atol=2e-5)
        print("OK", lanton.library_info()["path"])
    """)
    out = run_python(code, tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_registering_again_is_safe(tmp_path):
    """load_library twice, a cleared cache, a reloaded module and a fresh import of the package
    all return the library registered first, and steps keep running."""
    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    # A second copy of the library at another path: XLA would refuse its handlers under the same
    # target names ("duplicate registration with different bundle addresses").
    other = tmp_path / "other" / "liblanton.so"
    other.parent.mkdir()
    code = STEP + textwrap.dedent(f"""
        import importlib, os, shutil, sys, warnings
        first = step()
        lib = lanton.load_library()
        path = lanton.library_info()["path"]
        assert lanton.load_library() is lib

        def check(new_lib):
            assert new_lib._handle == lib._handle, (new_lib, lib)
            for k, v in step().items(): np.testing.assert_array_equal(v, first[k])

        lanton._ffi._state.clear()                      # the module's cache forgotten
        check(lanton.load_library())
        importlib.reload(lanton._ffi)                   # the module re-executed
        check(lanton._ffi.load_library())
        for name in [m for m in sys.modules if m == "lanton" or m.startswith("lanton.")]:
            del sys.modules[name]                       # the package imported afresh
        lanton = importlib.import_module("lanton")
        check(lanton.load_library())

        shutil.copy2(path, {str(other)!r})              # another library file, same targets
        os.environ["LANTON_LIBRARY"] = {str(other)!r}
        importlib.reload(lanton._ffi)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check(lanton._ffi.load_library())
        assert any("registered its XLA targets from" in str(w.message) for w in caught), caught
        assert lanton.library_info()["path"] == path
        print("OK")
    """)
    out = run_python(code, tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
