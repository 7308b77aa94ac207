"""Bad input raises a Python exception that names the leaf, the expected and the actual thing."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import lanton
from models import random_grads, transformer_params


@pytest.fixture
def params():
    return transformer_params(jax.random.key(0))


def test_label_that_is_no_group(params):
    labels = lanton.default_labels(params)
    labels["blocks"][1]["mlp"]["fc"] = "ffn_group"
    with pytest.raises(ValueError, match=r"leaf 'blocks/1/mlp/fc' has label 'ffn_group', which is no group"):
        lanton.lanton(labels=labels).init(params)


def test_unknown_group_kind():
    with pytest.raises(ValueError, match=r"unknown group kind 'conv'"):
        lanton.lanton(groups={"hidden": lanton.Group("conv")})


def test_labels_with_wrong_structure(params):
    labels = lanton.default_labels(params)
    del labels["wpe"]
    with pytest.raises(ValueError, match=r"labels must have an entry for every parameter leaf, or for a subtree holding it .*: leaf 'wpe' has none"):
        lanton.lanton(labels=labels).init(params)


def test_gradients_with_wrong_structure_or_shape(params):
    tx = lanton.lanton()
    state = tx.init(params)
    g = random_grads(jax.random.key(1), params)
    bad = dict(g)
    del bad["wpe"]
    with pytest.raises(ValueError, match=r"gradients do not match"):
        tx.update(bad, state, params)
    g["blocks"][0]["attn"]["q"] = jnp.zeros((32, 31))
    with pytest.raises(ValueError, match=r"leaf 'blocks/0/attn/q': gradient shape \(32, 31\) != parameter shape \(32, 32\)"):
        tx.update(g, state, params)


def test_unsupported_dtype(params):
    params["blocks"][0]["attn"]["q"] = params["blocks"][0]["attn"]["q"].astype(jnp.int32)
    with pytest.raises(TypeError, match=r"leaf 'blocks/0/attn/q': unsupported dtype int32"):
        lanton.lanton().init(params)


def test_axis_spec_that_does_not_fit(params):
    dims = jax.tree.map(lambda _: None, params)
    dims["scanned"]["kernel"] = lanton.DimSpec(reduction_axes=1, output_axes=3)
    with pytest.raises(ValueError, match=r"leaf 'scanned/kernel': output axis 3 is out of range for a rank-3 leaf"):
        lanton.lanton(dim_numbers=dims).init(params)
    dims["scanned"]["kernel"] = lanton.DimSpec(reduction_axes=1, output_axes=1)
    with pytest.raises(ValueError, match=r"leaf 'scanned/kernel': reduction axes \(1,\) and output axes \(1,\) overlap"):
        lanton.lanton(dim_numbers=dims).init(params)


def test_hidden_vector_leaf(params):
    labels = lanton.default_labels(params)
    labels["ln_f"]["bias"] = "hidden"
    with pytest.raises(ValueError, match=r"leaf 'ln_f/bias' of kind 'hidden' needs at least 2 axes"):
        lanton.lanton(labels=labels).init(params)


def test_missing_params(params):
    tx = lanton.lanton()
    with pytest.raises(ValueError, match=r"needs the parameters"):
        tx.update(params, tx.init(params), None)


def test_traced_structural_option_is_explained(params):
    import optax

    tx = optax.inject_hyperparams(lanton.lanton)(learning_rate=0.02, noise_every=5)
    with pytest.raises(TypeError, match=r"'noise_every' is structural.*static_args"):
        jax.jit(tx.update)(params, tx.init(params), params)


def test_rust_side_error_names_the_leaf(params):
    """Errors the shim cannot see still come back as exceptions naming the leaf (not a crash)."""
    if not lanton.kernels_available():
        pytest.skip("liblanton not built")
    from lanton import _ffi
    from lanton._config import StepConfig

    p = jnp.zeros((1, 4, 4))
    bad_noise = jnp.zeros((2,), jnp.float32)  # one entry per layer expected: 1
    leaf = (p, p, p, p, bad_noise, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), True, (1, 4, 4))
    with pytest.raises(Exception, match=r"my/leaf \(noise\): expected 1 elements \(one per layer\), got shape \[2\]"):
        out = _ffi.group_step(StepConfig("hidden"), jnp.zeros(5), jnp.int32(1), [leaf], ["my/leaf"], in_place=False)
        jax.block_until_ready(out)
    # The (layers, rows, cols) the shim states must fit the buffer.
    leaf = (p, p, p, p, jnp.zeros((1,)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), True, (1, 4, 5))
    with pytest.raises(Exception, match=r"my/leaf \(param\): attribute layer_dims gives .* \[1, 4, 5\].*shape \[1, 4, 4\]"):
        jax.block_until_ready(_ffi.group_step(StepConfig("hidden"), jnp.zeros(5), jnp.int32(1), [leaf], ["my/leaf"], in_place=False))


def test_missing_library_gives_clear_message(tmp_path):
    code = (
        "import lanton\n"
        "try:\n    lanton.load_library()\nexcept lanton.LibraryError as e:\n    print('ERR', e)\n"
        "print('available', lanton.kernels_available())\n"
    )
    env = {**os.environ, "LANTON_LIBRARY": str(tmp_path / "nope.so")}
    # Hide the bundled and development copies by running from a copy of the package.
    pkg = Path(lanton.__file__).resolve().parent
    dst = tmp_path / "pkg" / "lanton"
    dst.mkdir(parents=True)
    for f in pkg.glob("*.py"):
        (dst / f.name).write_text(f.read_text())
    env["PYTHONPATH"] = str(dst.parent)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "ERR liblanton not found" in out.stdout, out.stdout + out.stderr
    assert "nope.so" in out.stdout and "available False" in out.stdout


def test_mesh_options_are_checked(params):
    import numpy as np
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with pytest.raises(TypeError, match=r"option 'mesh' must be a jax.sharding.Mesh or AbstractMesh, None or False, got list"):
        lanton.lanton(mesh=[0, 1])
    with pytest.raises(TypeError, match=r"option 'mesh' must be a jax.sharding.Mesh or AbstractMesh, None or False, got bool"):
        lanton.lanton(mesh=True)
    with pytest.raises(ValueError, match=r"option 'mesh_axes' needs a 'mesh'"):
        lanton.lanton(mesh=False, mesh_axes="x")
    with pytest.raises(ValueError, match=r"option 'mesh_axes': \['y'\] not among the mesh's axes \('x',\)"):
        lanton.lanton(mesh=mesh, mesh_axes="y")
    with pytest.raises(ValueError, match=r"option 'mesh_axes' needs a 'mesh'"):
        lanton.lanton(mesh_axes="x")
