"""Every README recipe runs as written.

The README's Python blocks that follow a `<!-- recipe: NAME -->` marker are read from README.md
and executed here, unchanged, on small models of each framework a user brings: Flax linen, Flax
NNX and Equinox, each a conv net with batch norm and a dense head. A recipe that builds `tx`
(the quickstart's chain, the hybrid recipe, custom groups, a mesh) is followed by the training
loop for the model's framework; the test then checks that the loss went down on a fixed batch
and that every parameter the recipe hands to lanton moved and stayed finite.
"""

import re
from pathlib import Path

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lanton
from models import transformer_params

README = Path(__file__).resolve().parents[2] / "README.md"
RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->\s*```python\n(.*?)```", re.S)


def recipes() -> dict:
    found = RECIPE.findall(README.read_text())
    names = [n for n, _ in found]
    assert len(set(names)) == len(names), f"recipe names repeat: {names}"
    return dict(found)


def test_the_readme_has_the_recipes_these_tests_run():
    assert set(recipes()) == {"tx", "loop-params", "loop-nnx", "loop-equinox", "hybrid", "groups", "mesh"}


def run(name, namespace):
    # What a reader has after the quickstart's first line.
    for name_, module in (("jax", jax), ("jnp", jnp), ("optax", optax), ("lanton", lanton)):
        namespace.setdefault(name_, module)
    exec(compile(recipes()[name], f"README.md:recipe:{name}", "exec"), namespace)
    return namespace


# One fixed batch of 8x8 images with 3 channels and 4 classes, seen every step (a loss that must fall).
IMAGES = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
CLASSES = jax.random.randint(jax.random.key(1), (16,), 0, 4)
DATA = [(IMAGES, CLASSES)] * 20


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# -- Flax linen: params and batch statistics are separate collections ------------------------
class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x, train):
        x = linen.Conv(8, (3, 3))(x)
        x = linen.BatchNorm(use_running_average=not train)(x)
        x = linen.relu(linen.Conv(8, (3, 3))(x)).mean(axis=(1, 2))
        return linen.Dense(4)(x)


def linen_setup():
    model = LinenCNN()
    variables = model.init(jax.random.key(2), IMAGES, train=False)

    def loss_fn(params, batch):
        x, y = batch
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return xent(logits, y)

    return {"params": variables["params"], "loss_fn": loss_fn}


# -- Flax NNX: nnx.Optimizer over the Params; BatchNorm's statistics update in place ----------
class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(self.bn(self.conv1(x)))).mean(axis=(1, 2))
        return self.head(x)


def nnx_setup():
    model = NnxCNN(nnx.Rngs(2))
    return {"model": model, "params": nnx.state(model, nnx.Param),
            "loss_fn": lambda model, batch: xent(model(batch[0]), batch[1])}


def nnx_params(ns):
    return nnx.state(ns["model"], nnx.Param)


# -- Equinox: the model is the parameters; BatchNorm's statistics live in an eqx.nn.State ------
class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k1)
        self.bn = eqx.nn.BatchNorm(8, axis_name="batch")
        self.conv2 = eqx.nn.Conv2d(8, 8, 3, padding=1, key=k2)
        self.head = eqx.nn.Linear(8, 4, key=k3)

    def __call__(self, x, state):  # x: (H, W, C), one example
        x, state = self.bn(self.conv1(jnp.transpose(x, (2, 0, 1))), state)
        return self.head(jax.nn.relu(self.conv2(x)).mean(axis=(1, 2))), state


def eqx_setup():
    model, state = eqx.nn.make_with_state(EqxCNN)(jax.random.key(2))

    def loss_fn(model, batch):
        x, y = batch
        logits, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        return xent(logits, y)

    return {"model": model, "params": eqx.filter(model, eqx.is_array), "loss_fn": loss_fn}


FRAMEWORKS = {
    "linen": (linen_setup, "loop-params", lambda ns: ns["params"]),
    "nnx": (nnx_setup, "loop-nnx", nnx_params),
    "equinox": (eqx_setup, "loop-equinox", lambda ns: eqx.filter(ns["model"], eqx.is_array)),
}


def train(framework, tx_recipe, steps=20):
    setup, loop, trained = FRAMEWORKS[framework]
    ns = {**setup(), "data": DATA[:steps]}
    before = jax.tree.map(np.asarray, trained(ns))
    first = float(ns["loss_fn"](ns.get("model", ns["params"]), DATA[0]))
    run(tx_recipe, ns)
    run(loop, ns)
    after = jax.tree.map(np.asarray, trained(ns))
    last = float(ns["loss_fn"](ns.get("model", ns["params"]), DATA[0]))
    return ns, before, after, first, last


def matrices(tree):
    """The conv kernels and the head's matrix."""
    return [x for x in jax.tree.leaves(tree) if x.ndim >= 2]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("tx_recipe", ["tx", "hybrid"])
def test_recipe_trains_each_framework(framework, tx_recipe):
    ns, before, after, first, last = train(framework, tx_recipe)
    assert np.isfinite(last) and last < first, (first, last)
    moved = [not np.array_equal(a, b) for a, b in zip(matrices(before), matrices(after))]
    assert len(moved) >= 3 and all(moved), moved  # two convs and the head (and Equinox's conv biases)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
    # The optimizer state holds lanton's, whose per-layer statistics are readable.
    opt_state = ns["optimizer"].opt_state if framework == "nnx" else ns["opt_state"]
    stats = lanton.layer_stats(opt_state)
    assert any(name.endswith("kernel") or name.endswith("weight") for name in stats), sorted(stats)
    if tx_recipe == "hybrid":  # lanton steps only the hidden matrices; AdamW the rest
        assert all(s["noise"].shape is not None for s in stats.values())
        assert not any("bias" in name or "scale" in name for name in stats), sorted(stats)


def test_groups_recipe_on_a_transformer_tree():
    params = transformer_params(jax.random.key(0))
    loss_fn = lambda p, batch: sum(jnp.sum((x.astype(jnp.float32) - batch) ** 2) for x in jax.tree.leaves(p))
    ns = run("groups", {"params": params, "jax": jax, "lanton": lanton})
    ns.update(params=params, loss_fn=loss_fn, data=[0.0] * 3, optax=optax)
    run("loop-params", ns)
    assert int(ns["opt_state"].count) == 3
    # The relabelled matrix is in a group of its own, whose only layer has ratio 1.
    assert float(lanton.layer_stats(ns["opt_state"])["blocks/0/attn/q"]["ratio"]) == 1.0
    assert not np.array_equal(ns["params"]["blocks"][0]["attn"]["q"], params["blocks"][0]["attn"]["q"])


def test_mesh_recipe_trains_on_the_devices_there_are():
    ns = run("mesh", {"jax": jax, "lanton": lanton})
    assert isinstance(ns["mesh"], jax.sharding.Mesh)
    setup = linen_setup()
    ns.update(setup, data=DATA[:5], optax=optax)
    first = float(setup["loss_fn"](setup["params"], DATA[0]))
    run("loop-params", ns)
    assert float(ns["loss_fn"](ns["params"], DATA[0])) < first
    # lanton(mesh=) divides its work over the mesh without laying the caller's arrays out on it
    # (jax.make_mesh's axes are explicit: a Flax conv refuses operands typed with them).
    explicit = jax.sharding.AxisType.Explicit
    assert not any(explicit in getattr(getattr(x.sharding, "mesh", None), "axis_types", ())
                   for x in jax.tree.leaves(ns["params"]))
