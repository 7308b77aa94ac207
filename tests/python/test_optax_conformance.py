"""optax's generic expectations of an optimizer, adapted to lanton.

The parametrized checks that optax runs on every optimizer it ships (optax/_src/alias_test.py,
optax/contrib/_common_test.py, optax 0.2.8, where optax.contrib.muon is one of them), run on
`lanton.lanton` with its defaults and with the noise off. Each test names the optax test it
adapts. What lanton does differently, by design, is tested as such:
  * float64 and complex parameters are refused by name (the kernels are f32/bf16/f16);
  * the momentum's dtype is `momentum_dtype` (default float32 whatever the parameters' dtype),
    not the parameters' as optax's `mu_dtype=None` gives.
"""

import inspect
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lanton

# (name, options): optax's contrib tests run muon at learning_rate 1e-2; so do these.
CONFIGS = {"default": {}, "noise_off": {"noise_adaptive": False}}


def make(config, **kw):
    return lanton.lanton(**{"learning_rate": 1e-2, **CONFIGS[config], **kw})


# optax's targets (alias_test.py / _common_test.py): initial params, optimum, objective.
def parabola(dtype):
    final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype=dtype), final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def rosenbrock(dtype):
    a, b = 1.0, 100.0
    return (jnp.array([0.0, 0.0], dtype=dtype), jnp.array([a, a ** 2], dtype=dtype),
            lambda p: jnp.abs(a - p[0]) ** 2 + b * jnp.abs(p[1] - p[0] ** 2) ** 2)


def matrix_parabola(dtype):
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)
    return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def mixed_tensor_target(dtype):
    f1, f2 = jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
    return ((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2),
            lambda p: jnp.sum(jnp.abs(p[0] - f1) ** 2) + jnp.sum(jnp.abs(p[1] - f2) ** 2))


def jitted_step(tx, objective, **update_kwargs):
    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        updates, state = tx.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state
    return step


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("target", [parabola, rosenbrock, matrix_parabola, mixed_tensor_target])
def test_optimizers_converge_on_optax_targets(config, target):
    """_common_test.test_optimizers (alias_test.test_optimization): tree_map_params is a no-op
    on the state; 30,000 scanned steps reach optax's targets within its 3e-2."""
    tx = make(config)
    params, final, objective = target(jnp.float32)
    step = jitted_step(tx, objective)
    state = optax.tree_utils.tree_map_params(tx, lambda v: v, tx.init(params))
    (params, state), _ = jax.lax.scan(lambda c, _: (step(*c), None), (params, state), length=30_000)
    jax.tree.map(lambda p, f: np.testing.assert_allclose(p, f, rtol=3e-2, atol=3e-2), params, final)


@pytest.mark.parametrize("config", CONFIGS)
def test_optimizers_accept_extra_args_and_do_not_recompile(config):
    """test_optimizers_accept_extra_args (both files): update takes an argument it does not
    know; and a second call of the jitted step does not compile again."""
    tx = make(config)
    params, _, objective = rosenbrock(jnp.float32)
    step = jitted_step(tx, objective, unexpected_extra_args_your_optimizer_doesnt_expect=1)
    state = tx.init(params)
    params, state = step(params, state)
    compiled = step._cache_size()
    for _ in range(2):
        params, state = step(params, state)
    assert step._cache_size() == compiled, "the optimizer recompiles on the second call to update"
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("config", CONFIGS)
def test_can_be_wrapped_in_inject_hyperparams(config):
    """test_optimizers_can_be_wrapped_in_inject_hyperparams: the injected optimizer gives the
    same updates and inner state as the plain one (optax's params: a matrix and a stack of two)."""
    kw = {"learning_rate": 1e-2, **CONFIGS[config]}
    static = tuple(k for k, v in kw.items() if isinstance(v, bool))
    tx, injected = lanton.lanton(**kw), optax.inject_hyperparams(lanton.lanton, static_args=static)(**kw)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    # optax's grads are constant: add a ramp so the polar factor is not degenerate.
    grads = [g + 0.1 * jnp.arange(g.size, dtype=g.dtype).reshape(g.shape) for g in grads]
    updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    updates_i, state_i = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), updates_i, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state_i.inner_state, state)
    assert any(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_preserve_dtype(config, dtype):
    """test_preserve_dtype (both files): updates come back in the parameters' dtype."""
    tx = make(config)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert updates.dtype == params.dtype == grads.dtype


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation_with_multisteps(config, dtype):
    """test_gradient_accumulation: under optax.MultiSteps(every_k_schedule=4) the first mini-step's
    update is exactly zero; the fourth applies the mean gradient like the plain optimizer."""
    tx = make(config)
    multi = optax.MultiSteps(tx, every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
    state = jax.jit(multi.init)(params)
    update = jax.jit(multi.update)
    for i in range(4):
        updates, state = update(grads, state, params)
        if i < 3:
            np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
    plain, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates, np.float32), np.asarray(plain, np.float32), rtol=1e-6)
    assert float(jnp.abs(updates.astype(jnp.float32)).max()) > 0


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_state_shape_dtype_shard_stability(config, dtype):
    """test_state_shape_dtype_shard_stability: under lax.cond between the update and a
    pass-through, the state's shapes and dtypes are stable over two steps."""
    tx = make(config)
    params, _, objective = parabola(jnp.dtype(dtype))

    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, state = jax.lax.cond(cond, lambda: tx.update(grads, state, params), lambda: (params, state))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(2):
        params, new_state = step(params, state)
        assert params.dtype == jnp.dtype(dtype)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(new_state)] == \
            [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
        state = new_state


@pytest.mark.parametrize("dtype", ["float64", "complex64"])
def test_float64_and_complex_parameters_are_refused_by_name(dtype):
    """The dtypes of optax's stability and optimization tests that lanton's kernels do not have
    (float64, complex): refused at init, naming the leaf and the dtype, instead of a wrong answer."""
    with jax.enable_x64(True):
        params = {"w": jnp.zeros((3,), dtype)}
        with pytest.raises(TypeError, match=rf"leaf 'w': unsupported dtype {dtype} of the parameter"):
            lanton.lanton(1e-2).init(params)


@pytest.mark.parametrize("params_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("momentum_dtype", ["bfloat16", "float32", None])
def test_explicit_momentum_dtype(params_dtype, momentum_dtype):
    """alias_test.test_explicit_dtype (optax's mu_dtype): the momentum has the dtype asked for;
    None means lanton's default, float32 (optax's None means the parameters' dtype)."""
    tx = lanton.lanton(0.1, momentum_dtype=momentum_dtype)
    state = tx.init({"w": jnp.zeros((4, 3), params_dtype)})
    assert state.momentum["w"].dtype == jnp.dtype(momentum_dtype or "float32")


def test_learning_rate_is_annotated_as_a_schedule_and_a_constant_schedule_equals_the_float():
    """_common_test.test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such."""
    hints = typing.get_type_hints(lanton.lanton)
    assert hints["learning_rate"] == optax.ScalarOrSchedule
    assert inspect.signature(lanton.lanton).parameters["learning_rate"].default == 0.0075
    params, _, objective = parabola(jnp.float32)
    out = {}
    for name, lr in (("schedule", optax.constant_schedule(1e-3)), ("float", 1e-3)):
        tx = lanton.lanton(lr)
        p, s = params, tx.init(params)
        for _ in range(10):
            u, s = tx.update(jax.grad(objective)(p), s, p)
            p = optax.apply_updates(p, u)
        out[name] = p
    np.testing.assert_allclose(out["schedule"], out["float"], rtol=1e-6)
    assert not np.allclose(out["float"], params)


def test_apply_if_finite_skips_a_non_finite_step_and_keeps_the_state():
    """optax.apply_if_finite around lanton: a step with a NaN gradient is dropped whole (zero
    updates, the inner state unchanged), a finite one goes through."""
    tx = optax.apply_if_finite(lanton.lanton(1e-2), max_consecutive_errors=3)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    state = tx.init(params)
    bad = {"w": jnp.full((4, 3), jnp.nan), "b": jnp.ones(3)}
    updates, state2 = jax.jit(tx.update)(bad, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(state2.notfinite_count) == 1
    jax.tree.map(np.testing.assert_array_equal, state2.inner_state, state.inner_state)
    good = jax.tree.map(lambda p: 0.5 * p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
    updates, state3 = jax.jit(tx.update)(good, state2, params)
    assert int(state3.notfinite_count) == 0 and all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_scalar_parameters_step_as_vectors():
    """A 0-d parameter (optax's optimizers take scalars) steps, as a one-element vector."""
    tx = lanton.lanton(1e-2)
    params = {"t": jnp.asarray(2.0), "w": jnp.ones((3, 2))}
    state = tx.init(params)
    step = jitted_step(tx, lambda p: p["t"] ** 2 + jnp.sum(p["w"] ** 2))
    for _ in range(3):
        params, state = step(params, state)
    assert params["t"].shape == () and float(params["t"]) < 2.0
