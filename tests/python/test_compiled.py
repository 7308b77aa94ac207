"""What XLA compiles around the kernels: with params and state donated, each buffer is updated
where it lies. A reshape of a donated buffer on its way into the custom call (or a mismatched
donation order) makes XLA copy every parameter and state buffer in and out of the call; the
in-place path used to cost 1.4x the ordinary one on GPT-2 small that way."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import lanton
from models import random_grads, transformer_params

pytestmark = pytest.mark.skipif(not lanton.kernels_available(), reason="liblanton not built")


def big_copies(compiled_text, min_elements=256):
    """Copies (plain, or fusions XLA named after a copy) of at least `min_elements` elements in
    the entry computation of a compiled module."""
    entry = compiled_text[compiled_text.index("ENTRY"):]
    found = []
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%\S+) = \w+\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", line)
        if not m:
            continue
        name, dims, op = m.groups()
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        if n >= min_elements and (op == "copy" or (op == "fusion" and "copy" in name)):
            found.append(line.strip()[:160])
    return found


@pytest.fixture
def setup():
    params = transformer_params(jax.random.key(0))
    return params, random_grads(jax.random.key(1), params)


def test_the_in_place_step_copies_no_buffer(setup):
    params, grads = setup
    fz = lanton.fused(0.02)
    text = fz.step.lower(grads, fz.init(params), params).compile().as_text()
    assert "custom-call" in text
    assert big_copies(text) == []


def training_step(tx):
    """update + apply_updates, as a training loop jits it."""
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return step


def test_a_donated_update_step_copies_no_buffer(setup):
    params, grads = setup
    tx = lanton.lanton(0.02)
    step = training_step(tx)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile().as_text()
    assert big_copies(text) == []
    # Without donation XLA must copy the state the kernel updates in place: the check sees it.
    undonated = jax.jit(step).lower(params, tx.init(params), grads).compile().as_text()
    assert len(big_copies(undonated)) >= 2


def test_the_in_place_step_still_returns_params_then_state(setup):
    params, grads = setup
    fz = lanton.fused(0.02, noise_every=1)
    p, s = fz.step(grads, fz.init(params), jax.tree.map(jnp.copy, params))
    assert isinstance(s, lanton.LantonState)
    assert jax.tree.structure(p) == jax.tree.structure(params)
    tx = lanton.lanton(0.02, noise_every=1)
    u, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_gpu_no_sync_check_sees_a_conditional_and_passes_the_step(setup):
    """tests/gpu/graph_check.py's no-sync check (run on a GPU by tests/gpu/run.sh), on CPU: the
    compiled step of lanton has no conditional or host transfer, and a lax.cond is caught."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "gpu" / "graph_check.py"
    spec = importlib.util.spec_from_file_location("graph_check", path)
    graph_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_check)
    params, grads = setup
    tx = lanton.lanton(0.02)
    step = jax.jit(training_step(tx), donate_argnums=(0, 1))
    text = step.lower(params, tx.init(params), grads).compile().as_text()
    assert graph_check.host_syncs(text) == []
    cond = jax.jit(lambda t, x: jax.lax.cond(t % 10 == 0, lambda v: v * 2, lambda v: v, x))
    found = graph_check.host_syncs(cond.lower(jnp.int32(3), jnp.ones(3)).compile().as_text())
    assert len(found) == 1 and "conditional(" in found[0], found
