"""Mixed precision (``config.dtype = "bfloat16"``) on the tiny LaDiC: parameters and optimizer state stay
float32, and the loss, its gradients and a sampling prediction agree with float32 within stated tolerances
(bfloat16 keeps 8 bits of mantissa: relative rounding 2^-8 = 0.4% per operation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import trainer
from ladic_jax.data import pipeline
from ladic_jax.evaluation.evaluator import sampler_config


@pytest.fixture(scope="module")
def pair(tiny_data_dir):
    """The same parameters and batch under a float32 and a bfloat16 family."""
    from tiny_setup import make_tiny_config

    cfg32 = make_tiny_config(tiny_data_dir)
    sk32 = trainer.skeleton(cfg32)
    state, _ = trainer.fresh_state(sk32, cfg32)
    cfg16 = make_tiny_config(tiny_data_dir, ["dtype=bfloat16"])
    sk16 = trainer.skeleton(cfg16)
    batch = next(pipeline.make_train_iterator(cfg32.input, sk32.family.tokenizer))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in ("image", "tokens", "token_mask")}
    return cfg32, sk32, sk16, state["params"], batch


def test_parameters_and_optimizer_state_stay_float32(pair):
    _, _, sk16, _, _ = pair
    leaves = jax.tree.leaves((sk16.abstract_state["params"], sk16.abstract_state["opt_state"]))
    assert {a.dtype for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_loss_and_gradients_agree_with_float32(pair):
    _, sk32, sk16, params, batch = pair
    rng = jax.random.key(3)

    def loss_and_grad(family):
        return jax.jit(jax.value_and_grad(lambda p: family.loss(p, batch, rng)[0]))(params)

    (l32, g32), (l16, g16) = loss_and_grad(sk32.family), loss_and_grad(sk16.family)
    assert l16.dtype == jnp.float32
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    v32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    v16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)]).astype(np.float32)
    cosine = v16 @ v32 / (np.linalg.norm(v16) * np.linalg.norm(v32))
    assert cosine > 0.99 and np.linalg.norm(v16) == pytest.approx(np.linalg.norm(v32), rel=5e-2)


def test_sampling_prediction_agrees_with_float32(pair):
    cfg32, sk32, sk16, params, batch = pair
    scfg = sampler_config(cfg32, steps=5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch["image"].shape[0], cfg32.input.max_length,
                                     sk32.family.text_config.hidden_size)), jnp.float32)

    def predict(family):
        ctx = family.sampling_context(params, {"image": batch["image"]}, scfg)
        return np.asarray(family.predict_x0(params, ctx, x, jnp.int32(400), jnp.zeros_like(x), scfg))

    p32, p16 = predict(sk32.family), predict(sk16.family)
    assert p16.dtype == np.float32
    # Relative to the prediction's spread: a few bfloat16 roundings through the network.
    assert np.max(np.abs(p16 - p32)) / np.std(p32) < 0.05


def test_other_dtypes_are_rejected_naming_the_field(tiny_data_dir):
    from tiny_setup import make_tiny_config

    with pytest.raises(config_lib.ConfigError, match=r"config.dtype must be one of \['float32', 'bfloat16'\]"):
        config_lib.validate(make_tiny_config(tiny_data_dir, ["dtype=float16"]))
