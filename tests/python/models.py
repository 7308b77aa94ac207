"""Small parameter trees and models shared by the tests."""

import jax
import jax.numpy as jnp


def transformer_params(key, dtype=jnp.float32, d=32, vocab=64, ctx=16, layers=2):
    """A plain-dict GPT: embeddings, per-layer attention/MLP matrices, biases, norms, a scanned
    stack (batch axis) and an untied head: every group kind appears."""
    ks = iter(jax.random.split(key, 64))
    n = lambda *s: (0.1 * jax.random.normal(next(ks), s)).astype(dtype)
    p = {"wte": n(vocab, d), "wpe": n(ctx, d), "blocks": [], "lm_head": n(d, vocab), "ln_f": {"scale": 1 + n(d), "bias": n(d)}}
    for _ in range(layers):
        p["blocks"].append({
            "attn": {"q": n(d, d), "k": n(d, d), "v": n(d, d), "o": n(d, d), "o_bias": n(d)},
            "mlp": {"fc": n(d, 4 * d), "proj": n(4 * d, d), "fc_bias": n(4 * d)},
            "ln_1": {"scale": 1 + n(d), "bias": n(d)},
        })
    p["scanned"] = {"kernel": n(3, d, 2 * d), "norm": {"scale": 1 + n(3, d)}}
    return p


def random_grads(key, params, scale=1.0):
    leaves, tdef = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    return tdef.unflatten([(scale * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(ks, leaves)])


def train_nnx_lm(model, tx, steps, seq=16, vocab=64):
    """Trains a Flax NNX language model (idx -> logits) with nnx.Optimizer(model, tx) on one fixed
    random batch; returns the losses and the optimizer."""
    import optax
    from flax import nnx

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    idx = jax.random.randint(jax.random.key(1), (4, seq), 0, vocab)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(idx[:, :-1]), idx[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)], optimizer
