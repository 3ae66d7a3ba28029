"""Fixtures for the trainer, sampler and evaluator tests: a tiny built dataset and a tiny LaDiC config."""

from __future__ import annotations

import os

import pytest

from tiny_setup import REPO, make_tiny_config


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


@pytest.fixture(scope="session")
def tiny_vq_dir(tiny_data_dir, tmp_path_factory):
    """A tiny VQ-VAE trained on the tiny shapes data (configs/vqvae_shapes.py:runlocal shrunk, 300 steps) and
    exported by ``ladic-convert vqvae``: the image tokenizer of the discrete family's tests. Its run
    directory is returned too (``tiny_vq_dir.workdir``), with the reconstruction evaluation written."""
    from ladic_jax import config as config_lib
    from ladic_jax import trainer
    from ladic_jax.cli import convert as convert_cli
    workdir = str(tmp_path_factory.mktemp("tiny_vq_run"))
    cfg = config_lib.load_config(os.path.join(REPO, "configs/vqvae_shapes.py") + ":runlocal,steps=300")
    with cfg.unlocked():
        cfg.input.dataset = "shapes_captions/tiny"
        cfg.input.data_dir = tiny_data_dir
        cfg.model.update(channels=(32, 32, 32), embed_dim=16, num_codes=32, dead_code_threshold=0.05)
        cfg.optim.update(lr=5e-3, warmup=0.05)
        cfg.input.batch_size = 16
        cfg.checkpoint.every_steps = 1000
        cfg.log_every = 50
    trainer.train_and_evaluate(cfg, workdir)
    out = str(tmp_path_factory.mktemp("tiny_vq") / "vq")
    convert_cli.main(["vqvae", "--workdir", workdir, "--out", out])
    return TinyVQ(out, workdir)


class TinyVQ(str):
    """The export directory (a str), with the run directory it came from."""

    def __new__(cls, path, workdir):
        obj = super().__new__(cls, path)
        obj.workdir = workdir
        return obj
