"""Layer-group labels and axis specifications.

`default_labels(params)` assigns every leaf a group kind from its path and rank:
  * rank <= 1, or a norm/bias parameter (key `scale`, `bias`, `gamma`, `beta`, or a path part
    containing `norm` or starting with `ln`) -> "vector" (leading axes of a rank >= 2 norm
    parameter, e.g. scanned layers, are batch axes);
  * a path part naming an embedding or output head (`embed*`, `wte`, `wpe`, `lm_head`, `head`,
    `unembed*`) -> "embed";
  * every other matrix -> "hidden", or with `split=True` (the paper's noise study) one of
    "qk" (query/key projections), "vo" (value/output projections), "mlp" (feed-forward
    matrices) where the key says which, "hidden" where it does not (e.g. a fused qkv matrix).
    The noise ratio r is taken within a group, so splitting keeps layers whose noise differs by
    ~100x by construction (MLP vs QK) from throttling each other.
It covers Flax linen (`params/Dense_0/kernel`), Flax NNX (`State` paths), Equinox modules
(`.weight`/`.bias` attributes) and plain dicts.

Axes: `DimSpec(reduction_axes, output_axes)` names d_in and d_out of a leaf (as
`optax.contrib.MuonDimensionNumbers` does); every other axis is a batch axis, and each slice over
the batch axes is its own layer with its own noise estimate. The default is Flax's layout
(..., d_in, d_out), except for leaves whose key is `weight` (Equinox / PyTorch: (..., d_out, d_in)).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import jax

VECTOR_KEYS = frozenset({"bias", "scale", "b", "gamma", "beta", "g", "weight_g"})
QK_KEYS = frozenset({"q", "k", "wq", "wk", "query", "key", "q_proj", "k_proj", "to_q", "to_k"})
VO_KEYS = frozenset({"v", "o", "wv", "wo", "value", "out", "v_proj", "o_proj", "out_proj", "to_v", "to_out"})
MLP_CONTAINERS = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "densereludense"})
MLP_PARTS = frozenset({"fc", "c_fc", "proj", "c_proj", "w1", "w2", "w3", "gate", "up", "down",
                       "gate_proj", "up_proj", "down_proj", "wi"})
SPLIT_GROUPS = ("qk", "vo", "mlp")
EMBED_PARTS = frozenset({"wte", "wpe", "lm_head", "head", "unembed", "unembedding", "output_embedding", "tok_embeddings"})


class DimSpec(NamedTuple):
    """Which axes of a leaf are d_in (reduction) and d_out (output); the rest are batch axes."""

    reduction_axes: Union[int, Sequence[int]]
    output_axes: Union[int, Sequence[int]]


def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path) -> list[str]:
    return [key_name(k) for k in path]


def path_str(path) -> str:
    return "/".join(path_names(path)) or "<root>"


def label_for(path, leaf, split: bool = False) -> str:
    names = [n.lower() for n in path_names(path)]
    last = names[-1] if names else ""
    ndim = getattr(leaf, "ndim", 0)
    if ndim <= 1 or last in VECTOR_KEYS or any("norm" in n or n.startswith("ln") for n in names):
        return "vector"
    if any(n in EMBED_PARTS or "embed" in n for n in names):
        return "embed"
    if split:
        # The role is named by the last key that is not the array's own name (`kernel`, `weight`).
        role = [n for n in names if n not in ("kernel", "weight", "w")]
        role = role[-1] if role else ""
        if any(n in MLP_CONTAINERS for n in names):
            return "mlp"
        if role in QK_KEYS:
            return "qk"
        if role in VO_KEYS:
            return "vo"
        if role in MLP_PARTS:
            return "mlp"
    return "hidden"


def default_labels(params, split: bool = False):
    """A pytree of group labels matching `params`: "hidden", "embed", "vector", and with
    `split=True` "qk" / "vo" / "mlp" for recognizable hidden matrices (see the module doc)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: label_for(p, x, split), params)


def default_dim_spec(path, leaf) -> DimSpec:
    names = path_names(path)
    if names and names[-1] == "weight":
        return DimSpec(reduction_axes=-1, output_axes=-2)
    return DimSpec(reduction_axes=-2, output_axes=-1)
