"""The GPU check's harness (tests/gpu/run.sh), run on CPU with a budget too short for it: every
part is listed in the summary the moment it ends, a part that cannot start for lack of time is
marked not run, nothing pretends to pass without a GPU, and the script fails. What the parts find
needs a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lanton

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.heavy(25)
def test_run_sh_saves_each_part_and_respects_its_budget(tmp_path):
    env = {**os.environ, "BUDGET_S": "20", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "LANTON_LIBRARY": lanton.library_info()["path"], "SETS": "tiny"}
    proc = subprocess.run(["bash", str(ROOT / "tests/gpu/run.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| part")}
    # The device check fails on CPU, and so does the suite (LANTON_REQUIRE_GPU: no silent skips).
    assert rows["device"].startswith("FAILED"), summary
    assert not rows.get("suite", "").startswith("passed"), summary
    assert "not run (budget spent)" in rows.values(), summary  # 20 s cannot hold them all
    assert list(rows)[:2] == ["device", "suite"]  # in order of value
    assert (tmp_path / "device.log").exists() and "Total:" in summary


@pytest.mark.parametrize("supported", [True, False])
def test_run_sh_sanitizes_every_kernel_alone_unless_the_device_is_refused(tmp_path, supported):
    # A stand-in compute-sanitizer (and a Python that fails at once, so the parts before take no
    # time): memcheck first, then racecheck once per kernel of the library's Kernel enum
    # (src/cuda/kernels.rs), then synccheck; a device the sanitizer refuses skips the rest.
    fake = tmp_path / "bin"
    fake.mkdir()
    said = "ok" if supported else "========= Error: Device not supported"
    (fake / "compute-sanitizer").write_text(f"#!/bin/sh\necho '{said}'\nexit {0 if supported else 1}\n")
    (fake / "compute-sanitizer").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "BUDGET_S": "120", "OUT": str(out),
           "PYTHON": "false", "LANTON_LIBRARY": "unused"}
    subprocess.run(["bash", str(ROOT / "tests/gpu/run.sh")], cwd=ROOT, env=env, capture_output=True, timeout=60)
    rows = [line.split("|")[1].strip() for line in (out / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| part")]
    kernels = re.findall(r'Kernel::\w+ => "(lanton_\w+)"', (ROOT / "src/cuda/kernels.rs").read_text())
    assert len(kernels) >= 10
    sanitizer_rows = rows[rows.index("memcheck"):]
    if supported:
        assert sanitizer_rows[0] == "memcheck" and sanitizer_rows[-1] == "synccheck"
        assert sorted(sanitizer_rows[1:-1]) == sorted(f"racecheck-{k}" for k in kernels)
    else:
        assert sanitizer_rows == ["memcheck", "racecheck, synccheck"]
    assert rows[:6] == ["device", "suite", "no-sync", "graphs", "step-time", "profile"]
