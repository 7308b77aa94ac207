"""The CUDA side of the shim, checked without a GPU by lowering for the `cuda` platform:
the targets are registered for both platforms, the hidden group's noise work is selected by a
conditional on the step count (both variants present), and the CPU lowering has one call."""

import re

import jax
import jax.numpy as jnp
import pytest

import lanton
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


def test_cuda_lowering_selects_noise_work_by_step():
    text = lowered("cuda")
    found = calls(text)
    kinds = sorted(k for _, k, _ in found)
    # hidden twice (noise work on / off), embed and vector once each.
    assert kinds == ["embed", "hidden", "hidden", "vector"], found
    assert sorted(re.findall(r"noise_work = (\w+)", text)) == ["false", "true"]
    assert all(dt == "bfloat16" for _, _, dt in found)


def test_cpu_lowering_has_one_call_per_group_and_options_pass_through():
    text = lowered("cpu", ns_dtype="float32")
    found = calls(text)
    assert sorted(k for _, k, _ in found) == ["embed", "hidden", "vector"], found
    assert "noise_work" not in text
    assert all(dt == "float32" for _, _, dt in found)


def test_noise_off_needs_no_conditional():
    text = lowered("cuda", noise_adaptive=False)
    assert "noise_work" not in text and len(calls(text)) == 3


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
