"""Layer-group labels and axis specifications.

Names. A leaf is known by the names a user sees: its path with wrapper attributes dropped (the
trailing `.value` of a Flax NNX `Variable`, so `attn/query/kernel/.value` is `attn/query/kernel`).
The same leaf gets the same name, label and axes whether the tree holds `nnx.Param` objects (at
`init`) or bare arrays (gradients at `update`).

`default_labels(params)` assigns every leaf a group kind from its names and rank:
  * rank <= 1, or a norm/bias parameter (key `scale`, `bias`, `gamma`, `beta`, or a path part
    containing `norm` or starting with `ln`) -> "vector";
  * a path part naming an embedding or output head (`embed*`, `wte`, `wpe`, `lm_head`, `head`,
    `unembed*`) -> "embed";
  * every other matrix -> "hidden", or with `split=True` (the paper's noise study) one of
    "qk" (query/key projections), "vo" (value/output projections), "mlp" (feed-forward
    matrices) where the key says which, "hidden" where it does not (e.g. a fused qkv matrix).
    The noise ratio r is taken within a group, so splitting keeps layers whose noise differs by
    ~100x by construction (MLP vs QK) from throttling each other.
It covers Flax linen (`params/Dense_0/kernel`), Flax NNX (`State` paths), Equinox modules
(`.weight`/`.bias` attributes) and plain dicts.

Axes. `DimSpec(reduction_axes, output_axes)` names d_in and d_out of a leaf (as
`optax.contrib.MuonDimensionNumbers` does); every other axis is a batch axis, and each slice over
the batch axes is its own layer with its own noise estimate. For a vector leaf the two sets
together are the vector's axes. `default_dim_spec` chooses, first rule that applies:
  * conv kernels (rank >= 3 and the key of the module holding the array or, for Equinox, its
    class name contains `conv`; or any rank >= 4 `kernel` / `weight` outside attention)
    are one matrix per kernel, the usual practice for Muon on convolutions: Flax
    `(*window, in, out)` -> (prod(window)*in) x out; Equinox / PyTorch `weight` `(out, in, *window)`
    -> out x (in*prod(window)). A conv bias (Equinox `(out, 1, ..., 1)`) is one vector;
  * Flax multi-head attention (`MultiHeadAttention` / `MultiHeadDotProductAttention`: a module
    with `query`, `key`, `value` and `out` children): the q/k/v kernels `(..., d_model, heads,
    head_dim)` are d_model x (heads*head_dim), the out kernel `(..., heads, head_dim, d_model)` is
    (heads*head_dim) x d_model, and the q/k/v biases `(..., heads, head_dim)` one vector each;
  * leaves whose key is `weight` (Equinox / PyTorch): `(..., d_out, d_in)`;
  * otherwise Flax's `(..., d_in, d_out)`; vectors: the last axis, leading axes are layers
    (scanned norms).
Override any of it per leaf with `dim_numbers=`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax

VECTOR_KEYS = frozenset({"bias", "scale", "b", "gamma", "beta", "g", "weight_g"})
QK_KEYS = frozenset({"q", "k", "wq", "wk", "query", "key", "q_proj", "k_proj", "to_q", "to_k"})
VO_KEYS = frozenset({"v", "o", "wv", "wo", "value", "out", "v_proj", "o_proj", "out_proj", "to_v", "to_out"})
MLP_CONTAINERS = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "densereludense"})
MLP_PARTS = frozenset({"fc", "c_fc", "proj", "c_proj", "w1", "w2", "w3", "gate", "up", "down",
                       "gate_proj", "up_proj", "down_proj", "wi"})
SPLIT_GROUPS = ("qk", "vo", "mlp")
EMBED_PARTS = frozenset({"wte", "wpe", "lm_head", "head", "unembed", "unembedding", "output_embedding", "tok_embeddings"})
# Attributes through which a framework wraps an array (Flax NNX Variable.value): not names.
WRAPPER_ATTRS = frozenset({"value", "raw_value"})
MHA_CHILDREN = ("query", "key", "value", "out")


class DimSpec(NamedTuple):
    """Which axes of a leaf are d_in (reduction) and d_out (output); the rest are batch axes."""

    reduction_axes: Union[int, Sequence[int]]
    output_axes: Union[int, Sequence[int]]


def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_wrapper(k) -> bool:
    return isinstance(k, jax.tree_util.GetAttrKey) and k.name in WRAPPER_ATTRS


def user_path(path) -> tuple:
    """The path without trailing wrapper attributes (NNX `Variable.value`)."""
    path = tuple(path)
    while len(path) > 1 and _is_wrapper(path[-1]):
        path = path[:-1]
    return path


def path_names(path) -> list[str]:
    return [key_name(k) for k in user_path(path)]


def path_str(path) -> str:
    return "/".join(path_names(path)) or "<root>"


def _holder_type(root, path) -> str:
    """Class name of the node that holds the leaf at `path` (an Equinox module says what its
    `weight` belongs to); "" where an exotic container hides it."""
    node = root
    for k in path[:-1]:
        try:
            if isinstance(k, jax.tree_util.DictKey):
                node = node[k.key]
            elif isinstance(k, jax.tree_util.SequenceKey):
                node = node[k.idx]
            elif isinstance(k, jax.tree_util.GetAttrKey):
                node = getattr(node, k.name)
            else:
                return ""
        except Exception:
            return ""
    return type(node).__name__


class LeafContext(NamedTuple):
    """What the default rules know of one leaf: its user-visible names (lower case), rank, and
    the structural facts found in the whole tree."""

    names: tuple
    ndim: int
    is_conv: bool
    mha_role: Optional[str]  # "query"/"key"/"value"/"out" inside a Flax multi-head attention


def tree_context(params) -> dict:
    """path string -> LeafContext for every leaf of `params` (one pass over the tree)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {path_str(p): tuple(n.lower() for n in path_names(p)) for p, _ in flat}
    # A Flax MHA module: a prefix with query/key/value/out children that each hold a kernel.
    prefixes = {n[:-2] for n in names.values() if len(n) >= 2 and n[-1] == "kernel" and n[-2] in MHA_CHILDREN}
    kernels = {n for n in names.values() if n and n[-1] == "kernel"}
    mha = {p for p in prefixes if all(p + (c, "kernel") in kernels for c in MHA_CHILDREN)}
    out = {}
    for path, leaf in flat:
        key = path_str(path)
        n = names[key]
        # Only the module that holds the array decides (a ConvNet may also hold Linear layers).
        holder = _holder_type(params, user_path(path)).lower() if n else ""
        role = n[-2] if len(n) >= 2 and n[:-2] in mha and n[-2] in MHA_CHILDREN else None
        ndim = getattr(leaf, "ndim", 0)
        # Named a conv, or a rank >= 4 kernel/weight outside attention (a scanned Dense would
        # be rank 3: only names can tell a Conv1D from it).
        is_conv = ((len(n) >= 2 and "conv" in n[-2]) or "conv" in holder
                   or (ndim >= 4 and role is None and n[-1:] in (("kernel",), ("weight",))))
        out[key] = LeafContext(n, ndim, is_conv, role)
    return out


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


def _one_level(x):
    """The children of the node `x` with their keys (no deeper)."""
    return jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]


def unwrapped(x):
    """The array a wrapper holds (a node whose one child is a wrapper attribute, such as an NNX
    Variable's `.value`), else None."""
    kids = _one_level(x)
    if len(kids) == 1 and len(kids[0][0]) == 1 and _is_wrapper(kids[0][0][0]):
        return kids[0][1]
    return None


def default_labels(params, split: bool = False):
    """A pytree of group labels for `params`: "hidden", "embed", "vector", and with
    `split=True` "qk" / "vo" / "mlp" for recognizable hidden matrices (see the module doc).

    A label stands where the array's wrapper stood (an NNX `Param`'s label is a plain string):
    the tree then fits both the bare arrays `nnx.Optimizer` passes to `update` and, as a prefix,
    the wrapped state it passes to `init`, which optax's masks (`optax.multi_transform`) accept."""
    is_wrapper = lambda x: unwrapped(x) is not None
    return jax.tree_util.tree_map_with_path(
        lambda p, x: label_for(p, unwrapped(x) if is_wrapper(x) else x, split), params, is_leaf=is_wrapper)


def default_dim_spec(ctx: LeafContext, kind: str) -> Optional[DimSpec]:
    """The default axes of a leaf of the given kind (module doc); None: the plain default."""
    nd, last = ctx.ndim, (ctx.names[-1] if ctx.names else "")
    if kind == "vector":
        whole = DimSpec((), tuple(range(nd)))
        if ctx.is_conv and nd >= 2:
            return whole
        if ctx.mha_role in ("query", "key", "value") and nd >= 2:
            return DimSpec((), (nd - 2, nd - 1))
        return None
    if nd >= 3 and ctx.is_conv:
        if last == "weight":  # (out, in, *window)
            return DimSpec(tuple(range(1, nd)), 0)
        return DimSpec(tuple(range(nd - 1)), nd - 1)  # (*window, in, out)
    if nd >= 3 and ctx.mha_role in ("query", "key", "value"):
        return DimSpec(nd - 3, (nd - 2, nd - 1))
    if nd >= 3 and ctx.mha_role == "out":
        return DimSpec((nd - 3, nd - 2), nd - 1)
    if last == "weight":
        return DimSpec(reduction_axes=-1, output_axes=-2)
    return DimSpec(reduction_axes=-2, output_axes=-1)
