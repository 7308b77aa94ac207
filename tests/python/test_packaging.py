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
    """The library this interpreter's lanton loads: the one setup.py bundled from cargo's report."""
    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    return Path(lanton.library_info()["path"])


def test_versions_agree():
    pyproject = tomllib.loads((BINDINGS / "pyproject.toml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lanton.__version__"}
    assert lanton.__version__ == cargo["package"]["version"]
    if lanton.kernels_available():
        assert lanton.library_info()["version"] == lanton.__version__


def test_declared_jax_range_is_the_tested_range():
    """pyproject's lower bounds are the versions `scripts/test_versions.sh oldest` tests; the main
    pins are in range, and the newest pass's pins (`scripts/test_versions.sh newest`) are no older;
    pyproject's comment names both ends."""
    deps = tomllib.loads((BINDINGS / "pyproject.toml").read_text())["project"]["dependencies"]
    lower = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in deps if ">=" in d)

    def pins(name):
        lines = (ROOT / name).read_text().splitlines()
        return dict(re.fullmatch(r"([\w-]+)==([\d.]+)", ln.split("#")[0].strip()).groups()
                    for ln in lines if "==" in ln.split("#")[0])

    version = lambda v: tuple(map(int, v.split(".")))
    oldest, main, newest = pins("requirements-oldest.txt"), pins("requirements.txt"), pins("requirements-newest.txt")
    comment = (BINDINGS / "pyproject.toml").read_text()
    for pkg in ("jax", "jaxlib", "optax"):
        assert oldest[pkg] == lower[pkg], (pkg, oldest[pkg], lower[pkg])
        assert version(main[pkg]) >= version(lower[pkg])
        assert version(newest[pkg]) >= version(main[pkg])
    assert newest["jax"] in comment and oldest["jax"] in comment and main["jax"] in comment


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


def load_setup_py():
    """jax_bindings/setup.py as a module (its setup() runs only as __main__)."""
    import runpy
    return runpy.run_path(str(BINDINGS / "setup.py"), run_name="lanton_setup")


def test_cargo_build_returns_the_library_where_cargo_put_it(tmp_path, monkeypatch):
    """With CARGO_TARGET_DIR set, the package bundles the library cargo built there, not a file
    in the crate's own target/ (real cargo; the target folder is a hard-linked copy of this
    checkout's release build, so cargo finds it fresh and builds nothing)."""
    if shutil.which("cargo") is None or not (ROOT / "target" / "release" / LIB_NAME).is_file():
        pytest.skip("needs cargo and a release build in target/")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copied = subprocess.run(["cp", "-al", str(ROOT / "target" / "release"), str(elsewhere / "release")])
    assert copied.returncode == 0
    monkeypatch.setenv("CARGO_TARGET_DIR", str(elsewhere))
    built = load_setup_py()["cargo_build_library"]()
    assert built == elsewhere / "release" / LIB_NAME and built.is_file()


def test_build_bundles_what_cargo_reports_and_never_a_stale_target_copy(tmp_path):
    """setup.py's build step copies the file named by cargo's own report into lanton/_lib/, with
    a stale library waiting in the crate's target/release/ (a stand-in cargo on PATH prints the
    report of a build into CARGO_TARGET_DIR); a report without the library is an error, by name."""
    setuptools = pytest.importorskip("setuptools")
    src = staged_sources(tmp_path)  # tmp_path/src: the crate folder is tmp_path
    (src / "lanton" / "_lib" / LIB_NAME).unlink()
    (tmp_path / "target" / "release").mkdir(parents=True)
    (tmp_path / "target" / "release" / LIB_NAME).write_bytes(b"stale")
    fake = tmp_path / "bin" / "cargo"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, pathlib, sys
        assert sys.argv[1:] == ["build", "--release", "--lib", "--message-format=json-render-diagnostics"], sys.argv
        out = pathlib.Path(os.environ["CARGO_TARGET_DIR"]) / "release"
        out.mkdir(parents=True, exist_ok=True)
        files = []
        if os.environ.get("FAKE_CARGO_LIB", "1") == "1":
            (out / "{LIB_NAME}").write_bytes(b"fresh from cargo")
            files = [str(out / "{LIB_NAME}"), str(out / "liblanton.rlib")]
        print(json.dumps({{"reason": "compiler-artifact", "target": {{"kind": ["cdylib", "rlib"]}}, "filenames": files}}))
        print(json.dumps({{"reason": "build-finished", "success": True}}))
    """))
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "CARGO_TARGET_DIR": str(tmp_path / "elsewhere")}
    env.pop("LANTON_SKIP_CARGO", None)
    build = lambda: subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "build")],
                                   cwd=src, env=env, capture_output=True, text=True, timeout=300)
    proc = build()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (src / "lanton" / "_lib" / LIB_NAME).read_bytes() == b"fresh from cargo"
    assert (tmp_path / "build" / "lanton" / "_lib" / LIB_NAME).read_bytes() == b"fresh from cargo"
    env["FAKE_CARGO_LIB"] = "0"
    proc = build()
    assert proc.returncode != 0 and f"cargo build reported 0 {LIB_NAME} artifacts" in proc.stderr, proc.stderr[-2000:]
    del setuptools
