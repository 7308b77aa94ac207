"""Builds the Rust library with cargo and bundles it into the package (lanton/_lib/).

The crate is the parent folder of this one. Set LANTON_SKIP_CARGO=1 to package a library
that is already in lanton/_lib/ (e.g. a CI artifact).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

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
            shutil.copy2(CRATE / "target" / "release" / LIB_NAME, target / LIB_NAME)
        super().run()


setup(cmdclass={"build_py": BuildWithCargo})
