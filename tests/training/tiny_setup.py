"""A tiny LaDiC config for the trainer, sampler and evaluator tests (imported by conftest and by the
subprocess helper sharded_losses.py).

The config is the real embedded default (configs/ladic_shapes.py:runlocal) with every network shrunk,
so that the tests exercise the same code path as the demo in seconds.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tiny_config(data_dir: str, overrides: list[str] = ()):
    from ladic_jax import config as config_lib
    cfg = config_lib.load_config(os.path.join(REPO, "configs/ladic_shapes.py") + ":runlocal")
    with cfg.unlocked():
        cfg.input.dataset = "shapes_captions/tiny"
        cfg.input.data_dir = data_dir
        cfg.model.text.pretrained = None
        cfg.model.text.config = dict(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
        cfg.model.text.split_layer = 1
        cfg.model.image.config.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                      patch_size=16, stem="patch")
        cfg.model.diffuser.overrides = dict(width=64, depth=2, num_heads=2, mlp_dim=128, dropout=0.0,
                                            attention_dropout=0.0)
        cfg.model.stats_batches = 2
        cfg.optim.update(lr=2e-3, warmup=0, decay="constant", frozen=[r"^text/(embeddings|layers_0)/",
                                                                       r"^(latent_(mean|std)|vocab_ids)$"])
        cfg.eval.at_end = False
        cfg.checkpoint.every_steps = 1000
    config_lib.apply_overrides(cfg, list(overrides))
    return cfg


def make_tiny_coca_config(data_dir: str, overrides: list[str] = ()):
    """configs/coca_shapes.py:runlocal with every network shrunk (the conv stem kept), on the tiny data."""
    from ladic_jax import config as config_lib
    cfg = config_lib.load_config(os.path.join(REPO, "configs/coca_shapes.py") + ":runlocal")
    small = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with cfg.unlocked():
        cfg.input.dataset = "shapes_captions/tiny"
        cfg.input.data_dir = data_dir
        cfg.model.clip.config.vision.update(small)
        cfg.model.clip.config.text.update(small)
        cfg.model.clip.config.projection_dim = 16
        cfg.model.decoder.overrides.update(width=64, depth=2, num_heads=2, mlp_dim=128)
    config_lib.apply_overrides(cfg, list(overrides))
    return cfg


def memorise(cfg, steps: int):
    """Trains a fresh model of ``cfg`` on one batch (the first 8 training images with their first reference)
    for ``steps`` steps: (skeleton, state, the host batch, the losses)."""
    from ladic_jax import sharding, trainer
    from ladic_jax.data import pipeline
    sk = trainer.skeleton(cfg)
    state, _ = trainer.fresh_state(sk, cfg)
    host = next(pipeline.make_eval_iterator(cfg.input, sk.family.tokenizer, split="train", batch_size=8))
    batch = sharding.global_batch({k: host[k] for k in ("image", "tokens", "token_mask")}, sk.mesh)
    step = trainer.make_train_step(sk)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return sk, state, host, losses
