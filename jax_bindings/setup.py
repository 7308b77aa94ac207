"""Builds the Rust library with cargo and bundles it into the package (lanton/_lib/).

The crate is the parent folder of this one. Set LANTON_SKIP_CARGO=1 to package a library
that is already in lanton/_lib/ (e.g. a CI artifact).

The wheel holds a native library that does not use Python's C API, so it is tagged
`py3-none-<platform>` (e.g. py3-none-linux_x86_64): one wheel per platform, any Python 3.
"""

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
except ImportError:  # older setuptools: the `wheel` package's
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent
CRATE = HERE.parent
LIB_NAME = "liblanton.dylib" if sys.platform == "darwin" else "liblanton.so"


class BuildWithCargo(build_py):
    def run(self):
        target = HERE / "lanton" / "_lib"
        if os.environ.get("LANTON_SKIP_CARGO") != "1":
            if shutil.which("cargo") is None:
                raise RuntimeError("building lanton needs Rust's cargo on PATH (https://rustup.rs)")
            subprocess.check_call(["cargo", "build", "--release", "--lib"], cwd=CRATE)
            target.mkdir(exist_ok=True)
            # Copied, then renamed into place: a running process may have the old file mapped.
            tmp = target / f".{LIB_NAME}.tmp"
            shutil.copy2(CRATE / "target" / "release" / LIB_NAME, tmp)
            os.replace(tmp, target / LIB_NAME)
        elif not (target / LIB_NAME).is_file():
            raise RuntimeError(f"LANTON_SKIP_CARGO=1 but there is no {target / LIB_NAME} to bundle")
        super().run()


class BinaryDistribution(Distribution):
    """The bundled library is native: install into platlib and build a platform wheel."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """Tags the platform wheel py3-none-<platform>: the library does not depend on Python's ABI."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildWithCargo, "bdist_wheel": PlatformWheel})
