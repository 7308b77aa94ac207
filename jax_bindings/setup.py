"""Builds the Rust library with cargo and bundles it into the package (lanton/_lib/).

The crate is the parent folder of this one. Set LANTON_SKIP_CARGO=1 to package a library
that is already in lanton/_lib/ (e.g. a CI artifact).

The wheel holds a native library that does not use Python's C API, so it is tagged
`py3-none-<platform>` (e.g. py3-none-linux_x86_64): one wheel per platform, any Python 3.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.dist import Distribution
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 has its own bdist_wheel (wheel's is a shim over it since wheel 0.44)
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    try:  # older setuptools: the `wheel` package's
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # neither (pip's isolated build always has one): no wheels, builds still work
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
CRATE = HERE.parent
LIB_NAME = "liblanton.dylib" if sys.platform == "darwin" else "liblanton.so"


def cargo_build_library() -> Path:
    """Runs `cargo build --release --lib` and returns the library cargo says it wrote.

    Cargo's own report (its JSON messages), not a guessed `target/release/`: the build obeys
    CARGO_TARGET_DIR, a `build.target-dir` in any cargo config and a workspace above the crate,
    and the file it names is the one this build produced (never a stale copy elsewhere)."""
    proc = subprocess.run(
        ["cargo", "build", "--release", "--lib", "--message-format=json-render-diagnostics"],
        cwd=CRATE, stdout=subprocess.PIPE, text=True)  # diagnostics go to stderr, as usual
    if proc.returncode != 0:
        raise RuntimeError(f"cargo build --release --lib failed (exit {proc.returncode}); its errors are above")
    found = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg.get("target", {}).get("kind", []):
            found += [Path(f) for f in msg.get("filenames", []) if Path(f).name == LIB_NAME]
    if len(found) != 1:
        raise RuntimeError(f"cargo build reported {len(found)} {LIB_NAME} artifacts ({found}), expected one")
    return found[0]


class BuildWithCargo(build_py):
    def run(self):
        target = HERE / "lanton" / "_lib"
        if os.environ.get("LANTON_SKIP_CARGO") != "1":
            if shutil.which("cargo") is None:
                raise RuntimeError("building lanton needs Rust's cargo on PATH (https://rustup.rs)")
            built = cargo_build_library()
            target.mkdir(exist_ok=True)
            # Copied, then renamed into place: a running process may have the old file mapped.
            tmp = target / f".{LIB_NAME}.tmp"
            shutil.copy2(built, tmp)
            os.replace(tmp, target / LIB_NAME)
        elif not (target / LIB_NAME).is_file():
            raise RuntimeError(f"LANTON_SKIP_CARGO=1 but there is no {target / LIB_NAME} to bundle")
        super().run()


class BinaryDistribution(Distribution):
    """The bundled library is native: install into platlib and build a platform wheel."""

    def has_ext_modules(self):
        return True


commands = {"build_py": BuildWithCargo}
if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """Tags the platform wheel py3-none-<platform>: the library does not depend on Python's ABI."""

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    commands["bdist_wheel"] = PlatformWheel


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import it
    setup(distclass=BinaryDistribution, cmdclass=commands)
