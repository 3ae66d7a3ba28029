"""CLIP-DiffusionLM and Prefix-diffusion through the shared trainer, sampler loop and evaluator: a tiny
batch is memorised and decodes to its training captions; the shapes configs' ``runlocal`` variants train
and evaluate through the CLI, with the diversity scores and CLIP re-ranking in the eval json."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding
from ladic_jax.data.text import normalize_caption
from ladic_jax.evaluation import report
from ladic_jax.evaluation.evaluator import sampler_config
from tiny_setup import memorise

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"clip_diffusionlm": "configs/clip_diffusionlm_shapes.py",
           "prefix_diffusion": "configs/prefix_diffusion_shapes.py"}
STEPS = 1200


def _tiny_config(family: str, data_dir: str, clip_dir: str, overrides=()):
    cfg = config_lib.load_config(os.path.join(REPO, CONFIGS[family]) + f":runlocal,clip={clip_dir}")
    with cfg.unlocked():
        cfg.input.dataset = "shapes_captions/tiny"
        cfg.input.data_dir = data_dir
        # The memorised captions are the first references: the closed vocabulary must come from those too.
        cfg.input.train_captions = "first"
        cfg.model.denoiser.update(width=64, depth=2, num_heads=2, mlp_dim=128, cond_hidden=64)
        cfg.optim.update(lr=2e-3, warmup=0, decay="constant")
        cfg.eval.at_end = False
        cfg.checkpoint.every_steps = 1000
    config_lib.apply_overrides(cfg, list(overrides))
    return cfg


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def memorised(request, tiny_data_dir, tiny_clip_dir):
    cfg = _tiny_config(request.param, tiny_data_dir, tiny_clip_dir)
    sk, state, host, losses = memorise(cfg, STEPS)
    return cfg, sk, state, host, losses


def test_loss_decreases(memorised):
    *_, losses = memorised
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10]), (losses[:3], losses[-3:])


def test_memorised_images_decode_to_their_captions(memorised):
    cfg, sk, state, host, _ = memorised
    want = [normalize_caption(r[0]) for r in host["references"]]
    images = sharding.global_batch({"image": host["image"]}, sk.mesh)
    for method, clamp in (("ddim", True), ("refeed", False)):
        fn = sampler_lib.make_sample_fn(sk.family, sampler_config(cfg, steps=5, method=method, clamp=clamp))
        got = sk.family.decode(np.asarray(fn(state["params"], images, jax.random.key(3))))
        assert sum(g == w for g, w in zip(got, want)) >= 7, (method, list(zip(got, want)))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shapes_config_runlocal_trains_and_evaluates(family, tiny_data_dir, tiny_clip_dir, tmp_path):
    from ladic_jax.cli import train as train_cli
    workdir = str(tmp_path / family)
    train_cli.main(["--config", os.path.join(REPO, CONFIGS[family]) + f":runlocal,clip={tiny_clip_dir}",
                    "--workdir", workdir, f"--config.input.data_dir={tiny_data_dir}",
                    "--config.input.dataset=shapes_captions/tiny"])
    res = report.latest_eval(workdir, "_s2")
    for key in ("bleu_4", "clip_score", "sem_fully_correct", "dist_1", "dist_2", "dist_3", "vocab_usage"):
        assert key in res, key
    records = report.read_captions(workdir, res["step"], "_s2")
    if family == "prefix_diffusion":  # 2 candidates per image, re-ranked by the CLIP: self-BLEU over them
        assert res["sampler"]["mbr"] == 2 and res["sampler"]["mbr_metric"] == "clip"
        assert "self_bleu" in res and all(len(r["candidates"]) == 2 for r in records)
        assert all(r["caption"] in r["candidates"] for r in records)


@pytest.mark.parametrize("spec", ["configs/clip_diffusionlm_flickr.py:runlocal",
                                  "configs/prefix_diffusion_coco.py:runlocal"])
def test_paper_config_runlocal_on_karpathy_captions(spec, real_data_dir, tmp_path):
    """clip_diffusionlm on karpathy_captions/flickr8k, prefix_diffusion on karpathy_captions/coco, each built
    from fake files in the true layout (tests/fake_datasets.py)."""
    from ladic_jax.cli import train as train_cli
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, spec), "--workdir", workdir,
                    f"--config.input.data_dir={real_data_dir}"])
    res = report.latest_eval(workdir)  # runlocal samples 2 steps, its own sampler's: no tag
    assert res["num_images"] > 0 and "dist_2" in res and "clip_score" in res
