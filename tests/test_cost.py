"""Flop counting of the sampler (ladic_jax/cost.py): every loop step counted, checked against the same program
compiled with its loop unrolled and against a closed-form count of the model's matrix multiplications."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import cost as cost_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import trainer
from ladic_jax.evaluation.evaluator import sampler_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sizes with the matrix multiplications dominating (elementwise work is a few % of the count).
B, L, D = 2, 16, 32                       # images, caption positions, text latent width
W, DEPTH, HEADS, M = 128, 2, 4, 512       # diffuser width, blocks, heads, MLP width
IMG, PATCH, VW, VM = 64, 16, 64, 256      # ViT: image side, patch, width, MLP width (1 block)
N = (IMG // PATCH) ** 2 + 1               # image tokens (patches + CLS)
FREQ = 256                                # sinusoidal features of the time MLP


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.load_config(os.path.join(REPO, "configs/ladic_shapes.py") + ":runlocal")
    with cfg.unlocked():
        cfg.input.update(max_length=L, image_size=IMG, eval_batch_size=B)
        cfg.model.text = dict(pretrained=None, split_layer=1, config=dict(
            vocab_size=30522, hidden_size=D, num_layers=2, num_heads=2, intermediate_size=64,
            max_position_embeddings=64))
        cfg.model.image.config.update(image_size=IMG, patch_size=PATCH, hidden_size=VW, num_layers=1, num_heads=2,
                                      intermediate_size=VM, stem="patch")
        cfg.model.diffuser.overrides = dict(width=W, depth=DEPTH, num_heads=HEADS, mlp_dim=M, time_freq_dim=FREQ)
        cfg.model.vocab = "full"
        cfg.sampler.update(guidance=1.0, self_cond=True)
    sk = trainer.skeleton(cfg)
    params = jax.jit(sk.init_fn)(jax.random.key(0))
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(B, IMG, IMG, 3)), jnp.float32)}
    return cfg, sk.family, params, batch


def diffuser_pass_flops(batch: int) -> float:
    """Multiply-adds x 2 of one denoiser pass (keys/values of the image come from the context)."""
    per_position = (2 * D * W                 # input projection of [x_t ; self-conditioning]
                    + DEPTH * (4 * W * W      # self-attention q, k, v, out
                               + 2 * L * W    # its scores and weighted sum
                               + 2 * W * W    # cross-attention q, out
                               + 2 * N * W    # its scores and weighted sum
                               + 2 * W * M)   # MLP
                    + W * D)                  # output projection
    time_mlp = FREQ * W + W * W
    return 2.0 * batch * (L * per_position + time_mlp)


def test_sampler_count_equals_the_unrolled_program(setup, monkeypatch):
    cfg, fam, params, batch = setup
    scfg = sampler_config(cfg, steps=5)
    rng = jax.random.key(1)
    cost = cost_lib.sampler_cost(fam, scfg, params, batch, rng)
    monkeypatch.setattr(sampler_lib.jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))
    unrolled = cost_lib.flops(sampler_lib.make_sample_fn(fam, scfg).lower(params, batch, rng).compile())
    assert cost.total == pytest.approx(unrolled, rel=0.02)
    assert cost.program < 0.5 * unrolled  # what XLA's count of the rolled loop alone says
    assert cost.total == pytest.approx(cost.context + cost.denoising + cost.finalize, rel=0.02)


def test_denoising_step_matches_the_closed_form_count(setup):
    cfg, fam, params, batch = setup
    cost = cost_lib.sampler_cost(fam, sampler_config(cfg, steps=5), params, batch, jax.random.key(1))
    passes = 2  # classifier-free guidance: conditional and null
    assert cost.step == pytest.approx(passes * diffuser_pass_flops(B), rel=0.10)


def test_thirty_steps_count_six_times_the_denoising_of_five(setup):
    cfg, fam, params, batch = setup
    c5, c30 = (cost_lib.sampler_cost(fam, sampler_config(cfg, steps=n), params, batch, jax.random.key(1))
               for n in (5, 30))
    assert (c5.loop_steps, c30.loop_steps) == (5, 30)
    assert c30.denoising == pytest.approx(6 * c5.denoising, rel=1e-6)
    assert c30.total - c5.total == pytest.approx(25 * c5.step, rel=0.02)
    assert c30.context == c5.context and c30.finalize == c5.finalize
