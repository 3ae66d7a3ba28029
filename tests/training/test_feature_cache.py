"""The frozen-feature cache (ladic_jax/feature_cache.py): what it holds equals the encoder, a step reading it
computes the same loss as a step running the encoder, the disk cache is reused only when it still matches, and
the configurations it cannot serve are named errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import feature_cache, sharding, trainer
from ladic_jax.data import pipeline

from tiny_setup import make_tiny_coca_config, make_tiny_config


def _config(data_dir, kind="memory", overrides=(), **model):
    cfg = make_tiny_config(data_dir, [f"feature_cache.kind={kind}", *overrides])
    with cfg.unlocked():
        cfg.optim.frozen.append(r"^image/")  # a frozen image encoder, as with a pretrained tower
        cfg.model.update(model)
    return cfg


def _setup(cfg, workdir):
    sk = trainer.skeleton(cfg)
    state, _ = trainer.fresh_state(sk, cfg)
    cache, notes = feature_cache.for_run(sk.family, state["params"], sk.mesh, cfg, str(workdir))
    return sk, state, cache, notes


@pytest.mark.parametrize("null", ["learned", "zero_image"])
def test_ladic_cache_holds_every_training_image_and_the_loss_is_unchanged(tiny_data_dir, tmp_path, null):
    cfg = _config(tiny_data_dir, null_condition=null, uncond_prob=0.5)
    sk, state, cache, notes = _setup(cfg, tmp_path)
    n_train = pipeline.num_eval_examples(cfg.input, "train")
    assert len(cache) == n_train and "computed once" in notes[0] and "host memory" in notes[0], notes
    fam, params = sk.family, state["params"]
    it = pipeline.make_train_iterator(cfg.input, fam.tokenizer, start_step=5)
    loss = jax.jit(lambda p, b, r: fam.loss(p, b, r, train=True))
    for i in range(2):
        local = next(it)
        cached = cache.attach(local)
        assert "image" not in cached and cached["image_tokens"].shape[0] == local["image"].shape[0]
        with_image = sharding.global_batch(local, sk.mesh)
        with_cache = sharding.global_batch(cached, sk.mesh)
        want = jax.jit(fam.frozen_features)(params, with_image["image"])
        np.testing.assert_allclose(np.asarray(with_cache["image_tokens"]), np.asarray(want), rtol=1e-6, atol=1e-6)
        rng = jax.random.key(i)
        (a, ma), (b, mb) = loss(params, with_image, rng), loss(params, with_cache, rng)
        np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
        for k in ma:
            np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_disk_cache_is_reused_and_rebuilt_when_the_encoder_changed(tiny_data_dir, tmp_path):
    cfg = _config(tiny_data_dir, kind="disk")
    sk, state, cache, notes = _setup(cfg, tmp_path)
    directory = tmp_path / "feature_cache"
    assert f"in {directory}" in notes[0] and "computed once" in notes[0], notes
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["shape"][0] == len(cache) and (directory / "image_tokens.npy").exists()
    again, notes2 = feature_cache.for_run(sk.family, state["params"], sk.mesh, cfg, str(tmp_path))
    assert "read from" in notes2[0], notes2
    ids = cache.ids
    assert len(set(ids.tolist())) == len(cache)
    before = np.array(cache.lookup(ids))  # (a copy: the table is the memory-mapped file)
    np.testing.assert_array_equal(again.lookup(ids), before)
    # Another image encoder: the stored features no longer match it, so they are computed again.
    params = dict(state["params"])
    params["image"] = jax.tree.map(lambda x: x * 1.5, params["image"])
    third, notes3 = feature_cache.for_run(sk.family, params, sk.mesh, cfg, str(tmp_path))
    assert "computed once" in notes3[0], notes3
    assert not np.allclose(third.lookup(ids), before)


def test_training_with_the_cache_logs_the_same_losses(tiny_data_dir, tmp_path, capsys):
    def run(kind):
        workdir = tmp_path / kind
        trainer.train_and_evaluate(_config(tiny_data_dir, kind=kind, overrides=["total_steps=3"]), str(workdir))
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [rec["train/loss"] for rec in map(json.loads, lines) if "train/loss" in rec]

    off, memory = run("off"), run("memory")
    assert len(off) == 3 and "[train] feature cache:" in capsys.readouterr().out
    np.testing.assert_allclose(memory, off, rtol=1e-4)


def test_an_image_outside_the_cache_is_named():
    cache = feature_cache.FeatureCache("image_tokens", np.array([7, 3, 5]), np.arange(3.0)[:, None])
    np.testing.assert_array_equal(cache.lookup(np.array([5, 7])), [[2.0], [0.0]])
    with pytest.raises(ValueError, match=r"image id 4 is not among the 3 training images"):
        cache.attach({"image_id": np.array([3, 4]), "image": np.zeros((2, 1))})


@pytest.mark.parametrize("change, match", [
    (["input.flip=true"], r"config.feature_cache.kind.*unaugmented.*config.input.flip"),
    (["feature_cache.kind=always"], r"config.feature_cache.kind"),
    (["feature_cache.kind=disk", "feature_cache.dir=gs://bucket/cache"], r"config.feature_cache.dir.*local"),
])
def test_bad_settings_are_named(tiny_data_dir, change, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        trainer.skeleton(_config(tiny_data_dir, overrides=change))


def test_a_trained_encoder_or_none_cannot_be_cached(tiny_data_dir):
    cfg = make_tiny_config(tiny_data_dir, ["feature_cache.kind=memory"])  # the ViT trains from scratch
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.frozen leaves \d+ of its parameters trained "
                                                     r"\(e.g. image/"):
        trainer.skeleton(cfg)
    coca = make_tiny_coca_config(tiny_data_dir, ["feature_cache.kind=memory"])
    with pytest.raises(config_lib.ConfigError, match=r"family 'coca' has no frozen encoder"):
        trainer.skeleton(coca)
