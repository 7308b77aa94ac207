"""Packaging: `pip wheel ./jax_bindings` builds a clean, platform-tagged wheel that installs and
runs the fused step where there is no cargo and no checkout; the versions the package declares
agree with the library's, Cargo.toml's and the tested ones."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

import lanton

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = ROOT / "jax_bindings"
LIB_NAME = "liblanton.dylib" if sys.platform == "darwin" else "liblanton.so"


def built_library() -> Path:
    for p in (ROOT / "target" / "release" / LIB_NAME, BINDINGS / "lanton" / "_lib" / LIB_NAME):
        if p.is_file():
            return p
    pytest.skip("liblanton not built")


def test_versions_agree():
    pyproject = tomllib.loads((BINDINGS / "pyproject.toml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lanton.__version__"}
    assert lanton.__version__ == cargo["package"]["version"]
    if lanton.kernels_available():
        assert lanton.library_info()["version"] == lanton.__version__


def test_declared_jax_range_is_the_tested_range():
    """pyproject's lower bounds are the versions scripts/test_oldest.sh tests; the main pins are in range."""
    deps = tomllib.loads((BINDINGS / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in deps if ">=" in d)

    def pins(name):
        lines = (ROOT / name).read_text().splitlines()
        return dict(re.fullmatch(r"([\w-]+)==([\d.]+)", ln.split("#")[0].strip()).groups()
                    for ln in lines if "==" in ln.split("#")[0])

    oldest, newest = pins("requirements-oldest.txt"), pins("requirements.txt")
    for pkg in ("jax", "jaxlib", "optax"):
        assert oldest[pkg] == lower[pkg], (pkg, oldest[pkg], lower[pkg])
        assert tuple(map(int, newest[pkg].split("."))) >= tuple(map(int, lower[pkg].split(".")))


def staged_sources(tmp_path) -> Path:
    """The package's sources (as git tracks them, no build leftovers) with the built library in
    lanton/_lib/, so the wheel is built with LANTON_SKIP_CARGO=1: no cargo run, no writes to the tree."""
    src = tmp_path / "src"
    shutil.copytree(BINDINGS, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", "*.so", "*.dylib", "dist"))
    shutil.copy2(built_library(), src / "lanton" / "_lib" / LIB_NAME)
    return src


def test_wheel_is_platform_tagged_clean_and_runs_without_cargo(tmp_path):
    src = staged_sources(tmp_path)
    wheels = tmp_path / "wheels"
    env = {**os.environ, "LANTON_SKIP_CARGO": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(wheels), "--no-deps"],
                           env=env, capture_output=True, text=True, timeout=300)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    # setuptools' "Package 'lanton._lib' is absent from the `packages` configuration" (and kin).
    assert "absent from" not in log and "Package would be ignored" not in log, log
    (wheel,) = wheels.glob("lanton-*.whl")
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    assert wheel.name == f"lanton-{lanton.__version__}-py3-none-{plat}.whl", wheel.name

    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert (target / "lanton" / "_lib" / LIB_NAME).is_file()

    # A machine without cargo or a checkout: no cargo on PATH, cwd elsewhere, no LANTON_LIBRARY.
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not (Path(d) / "cargo").exists() and ".cargo" not in d]
    run_env = {k: v for k, v in os.environ.items() if k not in ("LANTON_LIBRARY", "PYTHONPATH", "PATH")}
    run_env.update(PATH=os.pathsep.join(path), PYTHONPATH=str(target))
    code = textwrap.dedent("""
        import shutil, jax, jax.numpy as jnp, numpy as np, lanton
        assert shutil.which("cargo") is None
        print("FILE", lanton.__file__)
        print("LIB", lanton.library_info()["path"])
        params = {"w": jnp.arange(48.0).reshape(8, 6) / 48, "embed": jnp.ones((5, 6)), "b": jnp.zeros(6)}
        grads = jax.tree.map(lambda p: jnp.sin(3 * p) + 0.2, params)
        out = {}
        for backend in ("ffi", "reference"):
            tx = lanton.lanton(0.05, backend=backend)
            out[backend], _ = jax.jit(tx.update)(grads, tx.init(params), params)
        for k in params:
            np.testing.assert_allclose(out["ffi"][k], out["reference"][k], rtol=2e-4, atol=2e-5)
        print("OK")
    """)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run([sys.executable, "-c", code], env=run_env, cwd=outside, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr
    lib_path = Path(re.search(r"^LIB (.*)$", run.stdout, re.M).group(1))
    assert lib_path.is_relative_to(target), run.stdout
    assert Path(re.search(r"^FILE (.*)$", run.stdout, re.M).group(1)).is_relative_to(target), run.stdout
