"""The GPU check's harness (tests/gpu/run.sh), run on CPU with a budget too short for it: every
part is listed in the summary the moment it ends, a part that cannot start for lack of time is
marked not run, nothing pretends to pass without a GPU, and the script fails. What the parts find
needs a GPU."""

import os
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
