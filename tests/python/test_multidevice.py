"""lanton under sharded jit on 8 virtual CPU devices, and across two processes joined by
jax.distributed: parameters, state and layer_stats equal the one-device run, and with
`lanton(..., mesh=...)` each matrix is orthogonalized once per step in total (the library's
Newton-Schulz counter), not once per device as without it."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multidevice.py")
# LANTON_MULTIDEVICE_CASES narrows the layouts (scripts/test_versions.sh newest runs two of them).
ONLY = os.environ.get("LANTON_MULTIDEVICE_CASES")
CASES = [c for c in ["data", "fsdp_in", "fsdp_out", "fsdp_explicit", "layers", "2d"] if not ONLY or c in ONLY.split(",")]
MODES = ("repeated", "split", "auto")
# f32 round-off: the sharded program may order reductions differently.
TOL = {"params": 1e-5, "state": 1e-4, "layer_stats": 1e-4}


def launch(cases, devices, extra=()):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(SCRIPT), ",".join(cases), *map(str, extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def check(r, devices, processes):
    assert r["devices"] == devices and r["processes"] == processes
    for key, tol in TOL.items():
        assert r[key] <= tol, f"{r['case']}: {key} differs from the one-device run by {r[key]}"
    # The noise tracker was active: the within-group ratios are not all 1.
    assert r["ratios_vary"], r


@pytest.mark.heavy(83)
def test_eight_virtual_devices_match_one_device():
    rs = results(launch(CASES, 8))
    assert [(r["case"], r["mode"]) for r in rs] == [(c, m) for c in CASES for m in MODES]
    for r in rs:
        check(r, 8, 1)
        # mesh=False: every device repeats the whole step; with a mesh, given or the inputs'
        # own (the default), the work is divided.
        want = r["ns_runs_one_device"] * (8 if r["mode"] == "repeated" else 1)
        assert r["ns_runs"] == want, r


@pytest.mark.heavy(16)
def test_fused_divides_the_work_and_two_meshes_are_refused():
    (r,) = results(launch(["fused"], 8))
    # lanton.fused on FSDP-sharded inputs: the work divided (no warning), the same result, the
    # parameters back in the layouts they came in.
    assert r["warnings"] == [] and r["fused_ns_runs"] == r["ns_runs_one_device"] > 0, r
    assert r["fused_params"] <= TOL["params"], r
    assert r["layouts_kept"], r
    # Parameters on one mesh, gradients on another: refused, naming both.
    assert re.search(r"leaf '\S+' \(gradient\) is laid out on a mesh \{'a': 2, 'b': 4\}, but leaf '\S+' \(parameter\) "
                     r"on \{'x': 8\}", r["mixed_meshes"]), r


@pytest.mark.heavy(30)
def test_other_options_split_as_on_one_device():
    # Nesterov, noise relative to the signal, the mean statistic, power 1 with a floor; and
    # the median statistic; the staggered schedule; Option II (a second gradient per step): FSDP with the work split
    # equals one device.
    (r,) = results(launch(["variants"], 8))
    assert r["options"] <= TOL["params"] and r["option2"] <= TOL["params"] and r["ratios_vary"], r
    assert r["median"] <= TOL["params"] and r["median_ratios_capped_and_vary"], r
    # The staggered schedule: the same phases as one device (layers last stored G_prev on three
    # different steps).
    assert r["staggered"] <= TOL["params"] and r["staggered_phases_vary"], r


@pytest.mark.heavy(27)
def test_bf16_parameters_and_momentum_split_as_on_one_device():
    # The direction leaves the kernel in f32 whatever the momentum's dtype, and the split writes
    # delta in the kernels' order of operations, so it adds no rounding: within one bf16 spacing
    # of the one-device run after 20 steps (0 when measured; XLA may still fuse a multiply-add).
    (r,) = results(launch(["bf16"], 8))
    assert r["momentum_float32_ulps"] <= 1 and r["momentum_bfloat16_ulps"] <= 1, r


@pytest.mark.heavy(11)
def test_inside_the_users_shard_map():
    (r,) = results(launch(["user_shard_map"], 8))
    # Replicated parameters: every device steps the whole tree, as one device does.
    assert r["params"] <= TOL["params"] and r["state"] <= TOL["state"], r
    # Sharded parameters: refused by name (a shard is not a matrix to orthogonalize) ...
    assert re.search(r"inside shard_map the parameter '\S+' varies over the manual axes \['x'\]: each device would "
                     r"orthogonalize its shard as a whole matrix", r["sharded"]), r
    # ... unless mesh=False says each device holds whole matrices of its own.
    assert r["mesh_false"] == "ran", r


@pytest.mark.heavy(18)
def test_per_device_temporaries_shrink_with_the_devices():
    # XLA's memory analysis of the compiled FSDP step: with the work split, each device's
    # temporaries are a few times its 1/N share of the parameters (shards, their exchange and
    # the whole matrices of its run), halving from 4 to 8 devices; repeated, every device
    # gathers every matrix and its state whole (several times the parameters, whatever N).
    (r,) = results(launch(["memory"], 8))
    params, t = r["param_bytes"], r["temp_bytes"]
    assert t["split_8"] <= 6 * params / 8, r
    assert t["split_4"] >= 1.7 * t["split_8"], r
    assert t["repeated_8"] >= 3 * params and t["repeated_8"] >= 6 * t["split_8"], r


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.heavy(92)
def test_two_processes_with_jax_distributed_match_one_device():
    port = free_port()
    cases = [c for c in ("fsdp_in", "2d") if c in CASES]
    procs = [launch(cases, 4, (pid, 2, port)) for pid in range(2)]
    try:
        outs = [results(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rs in outs:
        assert [(r["case"], r["mode"]) for r in rs] == [(c, m) for c in cases for m in MODES]
        for r in rs:
            check(r, 8, 2)
    # Each process counts its own 4 devices' directions: split, the two add up to one device's.
    for i in range(len(outs[0])):
        a, b = outs[0][i], outs[1][i]
        want = a["ns_runs_one_device"] * (8 if a["mode"] == "repeated" else 1)
        assert a["ns_runs"] + b["ns_runs"] == want, (a, b)


def test_pad_layers_go_to_the_devices_with_the_least_work():
    # 16 attention, 4 MLP-in and 4 MLP-out matrices over 8 devices: each device gets two
    # attention matrices and one MLP matrix (not devices 0-3 both MLP ones, 4-7 none).
    from lanton._mesh import _Bucket, _place

    attn, fc, proj = (_Bucket("rows", True, [0], n, cost) for n, cost in ((16, 1), (4, 4), (4, 4)))
    _place([attn, fc, proj], 8)
    assert list(attn.source) == list(range(16)) and list(attn.slots) == list(range(16))
    fc_devices, proj_devices = set(fc.slots.tolist()), set(proj.slots.tolist())  # one row per device
    assert len(fc_devices) == 4 and len(proj_devices) == 4 and fc_devices | proj_devices == set(range(8))
    # Every real layer has one row, in order; the other rows are pads.
    for b in (attn, fc, proj):
        assert [b.source[s] for s in b.slots] == list(range(b.layers)) and len(b.source) % 8 == 0
    odd = _Bucket("cols", False, [0], 13, 1)
    _place([odd], 8)
    runs = odd.source.reshape(8, 2)
    assert all((run == 13).sum() <= 1 for run in runs) and sorted(odd.source[odd.slots]) == list(range(13))
