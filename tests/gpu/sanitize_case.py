"""A short CUDA case for compute-sanitizer: three steps of every group kind, bf16 and f32."""

import jax
import jax.numpy as jnp

import lanton

assert jax.default_backend() == "gpu", "needs jax's CUDA backend"
for dtype in (jnp.float32, jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 8)
    p = {"wte": jax.random.normal(ks[0], (33, 16), dtype), "q": jax.random.normal(ks[1], (16, 16), dtype),
         "fc": jax.random.normal(ks[2], (16, 40), dtype), "ln": {"scale": jnp.ones(16, dtype)}}
    tx = lanton.lanton(0.02, noise_every=2, backend="ffi")
    st = tx.init(p)
    for t in range(3):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape, x.dtype), p)
        u, st = jax.jit(tx.update)(g, st, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    jax.block_until_ready(p)
print("sanitize case done")
