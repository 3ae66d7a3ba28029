"""The switches that make training follow the LaDiC release (configs/ladic_official.py) or the paper
(configs/ladic_coco.py): gradient clipping, the weight-decay mask, and dropout in the frozen text encoder
while it computes the training targets."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import optim, trainer

from tiny_setup import REPO, make_tiny_config


def _optim_config(name):
    cfg = config_lib.load_config(os.path.join(REPO, "configs", name))
    with cfg.unlocked():
        cfg.optim.warmup = 0  # the first updates at the full rate (the warmup is not what is tested)
    return cfg.optim


def _adamw_by_hand(params, grads, lrs, o, decay_all: bool, clip: float):
    """Two AdamW updates written out (Loshchilov & Hutter; optax's placement of the decay: lr * wd * p)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: 0.0 for k in p}
    v = {k: 0.0 for k in p}
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        if clip:
            norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
            g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in p:
            m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
            v[k] = o.b2 * v[k] + (1 - o.b2) * g[k] ** 2
            mh, vh = m[k] / (1 - o.b1 ** t), v[k] / (1 - o.b2 ** t)
            wd = o.weight_decay if (decay_all or p[k].ndim >= 2) else 0.0
            p[k] = p[k] - lr * (mh / (np.sqrt(vh) + o.eps) + wd * p[k])
    return p


@pytest.mark.parametrize("config, decay_all, clip", [("ladic_official.py", True, 0.0),
                                                      ("ladic_coco.py", False, 1.0)])
def test_optimizer_decays_and_clips_as_the_config_says(config, decay_all, clip):
    o = _optim_config(config)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)), "scale": 1 + rng.normal(size=(3,))}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    # A large first gradient then a small one: clipping changes the second update (Adam's first is scale-free).
    grads = [{k: jnp.asarray(rng.normal(size=x.shape) * s, jnp.float32) for k, x in params.items()}
             for s in (50.0, 0.3)]
    tx, schedule = optim.make_optimizer(o, params, 1000)
    state, current = tx.init(params), params
    moved = {k: np.zeros(v.shape) for k, v in params.items()}  # the sum of the updates, in float64
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = jax.tree.map(lambda p, u: p + u, current, updates)
        moved = {k: moved[k] + np.asarray(updates[k], np.float64) for k in moved}
    lrs = [float(schedule(0)), float(schedule(1))]
    want = _adamw_by_hand(params, grads, lrs, o, decay_all, clip)
    other = _adamw_by_hand(params, grads, lrs, o, not decay_all, 1.0 - clip)  # the other config's behaviour
    for k in params:
        start = np.asarray(params[k], np.float64)
        np.testing.assert_allclose(moved[k], want[k] - start, rtol=1e-5, atol=1e-10, err_msg=k)
        assert np.max(np.abs(other[k] - want[k])) > 1e-7, k  # each switch shows in the values
    assert o.weight_decay > 0


def test_bad_weight_decay_mask_is_named():
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "ladic_official.py") + ":runlocal")
    config_lib.apply_overrides(cfg, ["optim.weight_decay_mask=biases"])
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.weight_decay_mask"):
        config_lib.validate(cfg)


@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    out = {}
    for rate in (0.0, 0.1):
        cfg = make_tiny_config(tiny_data_dir)
        with cfg.unlocked():
            cfg.model.text.target_dropout = rate
        sk = trainer.skeleton(cfg)
        out[rate] = sk.family
    params = jax.jit(out[0.0].module.init)(jax.random.key(0), *_init_args(out[0.0]))["params"]
    return out, params


def _init_args(fam):
    from ladic_jax.trainer import dummy_batch
    b = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy_batch(fam.config, 2).items()}
    return b["tokens"], b["token_mask"], b["image"]


def test_target_dropout_makes_two_encodings_of_a_caption_differ(tiny):
    fams, params = tiny
    tok = fams[0.1].tokenizer
    enc = tok(["a red circle above a blue square", "two green triangles"], padding="max_length", max_length=32,
              return_tensors="np")
    tokens, mask = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
    on, off = fams[0.1], fams[0.0]
    fn = {name: jax.jit(lambda p, t, m, r, f=f: f.text_latents(p, t, m, r)[0]) for name, f in (("on", on), ("off", off))}
    a, b = fn["on"](params, tokens, mask, jax.random.key(1)), fn["on"](params, tokens, mask, jax.random.key(2))
    plain = jax.jit(lambda p, t, m: off.text_latents(p, t, m)[0])(params, tokens, mask)
    real = np.asarray(mask, bool)[..., None] & ~np.asarray(on._is_special(tokens))[..., None]
    diff = np.abs(np.asarray(a) - np.asarray(b)) * real
    assert diff.max() > 0.1, diff.max()  # dropout on: two target computations differ
    np.testing.assert_array_equal(np.asarray(fn["off"](params, tokens, mask, jax.random.key(1))),
                                  np.asarray(fn["off"](params, tokens, mask, jax.random.key(2))))
    np.testing.assert_array_equal(np.asarray(fn["off"](params, tokens, mask, jax.random.key(1))), np.asarray(plain))
    # Same rng, same targets; no rng (sampling, statistics): no dropout even when the switch is on.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(fn["on"](params, tokens, mask, jax.random.key(1))))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda p, t, m: on.text_latents(p, t, m)[0])(params, tokens, mask)),
                                  np.asarray(plain))


def test_bad_target_dropout_is_named(tiny_data_dir):
    cfg = make_tiny_config(tiny_data_dir)
    with cfg.unlocked():
        cfg.model.text.target_dropout = 1.0
    with pytest.raises(config_lib.ConfigError, match=r"config.model.text.target_dropout"):
        trainer.skeleton(cfg)
