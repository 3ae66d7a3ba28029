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
