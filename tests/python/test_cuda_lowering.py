"""The CUDA side of the shim, checked without a GPU by lowering for the `cuda` platform:
the targets are registered for both platforms, every step makes the same calls (no conditional:
the hidden group's noise work is gated by its kernels on the device step count), every CUDA call
has a trailing uint8 scratch result of the size the library's plan gives, and the CPU lowering
has one call per group and no scratch."""

import re

import jax
import jax.numpy as jnp
import pytest

import lanton
from lanton._ffi import RETS_PER_LEAF
from models import random_grads, transformer_params

pytestmark = pytest.mark.skipif(not lanton.kernels_available(), reason="fused kernels unavailable")


def lowered(platform, **kw):
    params = transformer_params(jax.random.key(0))
    tx = lanton.lanton(backend="ffi", **kw)
    state = tx.init(params)
    grads = random_grads(jax.random.key(1), params)
    check = jax.export.DisabledSafetyCheck.custom_call("lanton_step_update")
    exp = jax.export.export(jax.jit(tx.update), platforms=[platform], disabled_checks=[check])(grads, state, params)
    return exp.mlir_module()


def calls(text):
    return re.findall(r'stablehlo.custom_call @(\w+).*?kind = "(\w+)".*?ns_dtype = "(\w+)"', text)


def conditionals(text):
    """Control flow on device data in the lowered module: stablehlo.if, or a stablehlo.case whose
    index is not known at compile time (lax.cond lowers to one; on GPU XLA copies its predicate
    to the host). lax.platform_dependent lowers to a case on the constant platform index (and a
    case on that case's result), which XLA folds away when it compiles for one platform."""
    constant = set(re.findall(r"(%[\w#.]+) = stablehlo\.constant", text))
    found = re.findall(r"stablehlo\.if\b", text)
    for result, index in re.findall(r'(%[\w#.]+)(?::\d+)? = "stablehlo\.case"\((%[\w#.]+)\)', text):
        if index in constant:
            constant.add(result)
        else:
            found.append(f"{result} = case({index})")
    return found


def kinds_of(kw):
    """The calls' kinds: the default's hidden group and one call for its Adam part (embeddings,
    head, gains and biases); other="lmo": one per LMO group."""
    return ["embed", "hidden", "vector"] if kw.get("other") == "lmo" else ["adam", "hidden"]


@pytest.mark.parametrize("kw", [{}, {"noise_every": 1}, {"noise_adaptive": False}, {"other": "lmo"}])
def test_cuda_lowering_has_one_call_per_group_and_no_conditional(kw):
    text = lowered("cuda", **kw)
    found = calls(text)
    assert sorted(k for _, k, _ in found) == kinds_of(kw), found
    assert conditionals(text) == []
    assert "noise_work" not in text  # the handler's default: enqueued, gated on the device
    assert all(dt == "bfloat16" for _, _, dt in found)


def test_conditionals_are_seen():
    # The check above can fail: a lax.cond on the step count shows up in the same text.
    def f(t, x):
        return jax.lax.cond(t % 10 == 0, lambda v: v * 2, lambda v: v, x)

    text = jax.jit(f).lower(jnp.int32(3), jnp.ones(3)).as_text()
    assert conditionals(text), text


def test_cpu_lowering_has_one_call_per_group_and_options_pass_through():
    text = lowered("cpu", ns_dtype="float32")
    found = calls(text)
    assert sorted(k for _, k, _ in found) == kinds_of({}), found
    assert "noise_work" not in text
    assert all(dt == "float32" for _, _, dt in found)


def call_lines(text):
    return [ln for ln in text.splitlines() if re.search(r"stablehlo.custom_call @lanton_step_", ln)]


def result_types(line):
    """The result tensor types of a custom call line of the MLIR text."""
    results = line.rsplit("->", 1)[1]
    return re.findall(r"tensor<([^>]*)>", results)


def expected_scratch(line):
    """What lanton_cuda_scratch_bytes gives for the call's own attributes."""
    from lanton import _ffi

    kind = re.search(r'kind = "(\w+)"', line).group(1)
    adaptive = re.search(r"noise_adaptive = (\w+)", line).group(1) == "true"
    ns = re.search(r'ns_dtype = "(\w+)"', line).group(1)
    m = re.search(r"layer_dims = dense<(\[[-\d, ]*\]|-?\d+)> : tensor<(\d+)xi64>", line)
    values, n = m.group(1), int(m.group(2))
    flat = [int(x) for x in values.strip("[]").split(",")] if values.startswith("[") else [int(values)] * n
    dims = tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))
    return _ffi.cuda_scratch_bytes(kind, adaptive, True, ns, dims)


@pytest.mark.parametrize("kw", [{}, {"ns_dtype": "float32"}, {"noise_adaptive": False}])
def test_cuda_calls_have_a_scratch_result_sized_by_the_library(kw):
    lines = call_lines(lowered("cuda", **kw))
    assert len(lines) == 2, lines  # the hidden group, the Adam part
    sizes = {}
    for line in lines:
        types = result_types(line)
        assert len(types) % RETS_PER_LEAF == 1, types  # per leaf, then the scratch
        m = re.fullmatch(r"(\d+)xui8", types[-1])
        assert m, types[-1]
        assert int(m.group(1)) == expected_scratch(line) > 0
        assert not any("ui8" in t for t in types[:-1])
        sizes[re.search(r'kind = "(\w+)"', line).group(1)] = int(m.group(1))
    # The hidden group's cuBLAS workspace (32 MiB) and, with noise adaptation, polar buffers.
    assert sizes["hidden"] > 32 << 20, sizes
    if not kw:
        from lanton import _ffi

        dims = ((2, 16, 16), (2, 16, 64), (2, 64, 16))
        assert _ffi.cuda_scratch_bytes("hidden", True, True, "bfloat16", dims) > \
            _ffi.cuda_scratch_bytes("hidden", False, True, "bfloat16", dims)


def test_cpu_calls_have_no_scratch_result():
    for kw in ({}, {"noise_adaptive": False}):
        lines = call_lines(lowered("cpu", **kw))
        assert len(lines) == 2, lines  # the hidden group, the Adam part
        for line in lines:
            types = result_types(line)
            assert len(types) % RETS_PER_LEAF == 0 and not any("ui8" in t for t in types), types


def test_scratch_bytes_errors_are_clear():
    from lanton import _ffi

    with pytest.raises(ValueError, match=r"no CUDA scratch size for the hidden group: .*leaf 0 must be \[layers, rows, cols\]"):
        _ffi.cuda_scratch_bytes("hidden", True, True, "bfloat16", ((1, 2),))
    assert _ffi.cuda_scratch_bytes("vector", True, True, "bfloat16", ()) > 0


def test_bad_ns_dtype_is_refused_early():
    with pytest.raises(ValueError, match="ns_dtype must be 'bfloat16' or 'float32', got 'float16'"):
        lanton.lanton(ns_dtype="float16").init(transformer_params(jax.random.key(0)))


def test_split_labels_name_attention_and_mlp_groups():
    params = transformer_params(jax.random.key(0))
    labels = lanton.default_labels(params, split=True)
    blk = labels["blocks"][0]
    assert (blk["attn"]["q"], blk["attn"]["k"], blk["attn"]["v"], blk["attn"]["o"]) == ("qk", "qk", "vo", "vo")
    assert (blk["mlp"]["fc"], blk["mlp"]["proj"]) == ("mlp", "mlp")
    assert blk["mlp"]["fc_bias"] == "vector" and labels["wte"] == "embed"
    assert labels["scanned"]["kernel"] == "hidden"  # no role in its name: stays in the hidden group
    # The split groups work without declaring them, and each group has its own ratios.
    tx = lanton.lanton(labels=lambda p: lanton.default_labels(p, split=True))
    state = tx.init(params)
    _, state = tx.update(random_grads(jax.random.key(1), params), state, params)
    assert set(lanton.layer_stats(state)) >= {"blocks/0/attn/q", "blocks/1/mlp/fc"}


def test_the_work_split_lowers_for_cuda_without_conditionals():
    # lanton(mesh=...) over two devices (an abstract mesh: this process has one), lowered for
    # CUDA: still one call per group, with no conditional (each device's run of layers is
    # picked by indexing on the device index) and no per-device attribute; the exchange is
    # collectives.
    mesh = jax.sharding.AbstractMesh((2,), ("x",))
    text = lowered("cuda", mesh=mesh)
    assert sorted(k for _, k, _ in calls(text)) == kinds_of({})
    assert conditionals(text) == []
    assert "owned_layers" not in text
    assert "all_to_all" in text and "all_gather" in text
