"""Fixtures for the trainer, sampler and evaluator tests: a tiny built dataset and a tiny LaDiC config."""

from __future__ import annotations

import pytest

from tiny_setup import make_tiny_config


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from ladic_jax.data import shapes_captions
    d = str(tmp_path_factory.mktemp("tfds"))
    shapes_captions.build(d, "tiny")
    return d


@pytest.fixture
def tiny_config(tiny_data_dir):
    return lambda *overrides: make_tiny_config(tiny_data_dir, overrides)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache for the training processes the tests launch."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_data_dir, tmp_path_factory):
    """A tiny CLIP trained contrastively on the tiny shapes data (configs/coca_shapes.py:runlocal shrunk, 150
    steps) and exported by ``ladic-convert clip``: image features that tell the tiny images apart, for the
    CLIP-conditioned families (a random CLIP's pooled features of different images agree to 4 decimals)."""
    from ladic_jax import trainer
    from ladic_jax.cli import convert as convert_cli
    from tiny_setup import make_tiny_coca_config
    workdir = str(tmp_path_factory.mktemp("tiny_clip_run"))
    cfg = make_tiny_coca_config(tiny_data_dir, ["total_steps=150", "model.caption_weight=0.0",
                                                "model.pooled_caption_weight=0.0", "optim.lr=3e-3",
                                                "eval.at_end=False", "checkpoint.every_steps=1000"])
    trainer.train_and_evaluate(cfg, workdir)
    out = str(tmp_path_factory.mktemp("tiny_clip") / "clip")
    convert_cli.main(["clip", "--workdir", workdir, "--out", out])
    return out
