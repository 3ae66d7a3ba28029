"""The discrete family through the shared trainer, sampler loop and evaluator: the VQ-VAE image tokenizer
(trained by the one trainer, evaluated by reconstruction), the Masked Condition Strategy's rates, a tiny
memorised batch decoding to its captions at T and at 10 steps, guidance as the combination it claims to be,
the importance-sampling statistics kept by the step, and the configs' ``runlocal`` variants."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import feature_cache, sharding, trainer
from ladic_jax.data import pipeline
from ladic_jax.data.text import normalize_caption
from ladic_jax.evaluation import report
from ladic_jax.evaluation.evaluator import sampler_config
from ladic_jax.families import mc_diffusion
from tiny_setup import memorise

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 600


# ------------------------------------------------------------------------------------------------ VQ-VAE


def test_vqvae_trains_by_the_one_trainer_and_reconstructs(tiny_vq_dir, tiny_data_dir):
    res = report.latest_eval(tiny_vq_dir.workdir)
    cfg = config_lib.load_config(os.path.join(REPO, "configs/vqvae_shapes.py") + ":runlocal")
    with cfg.unlocked():
        cfg.input.update(dataset="shapes_captions/tiny", data_dir=tiny_data_dir)
    images = np.concatenate([b["image"][b["_mask"]] for b in pipeline.make_eval_iterator(cfg.input, None, limit=16)])
    # Well below the error of the best constant image (the per-pixel mean): the codes carry the scene (the
    # tiny fixture measured 0.50x; the shapes default's VQ-VAE 0.12x).
    baseline = float(np.mean(np.square(images - images.mean(0))))
    assert res["num_images"] == len(images)
    assert res["recon_mse"] < 0.6 * baseline, (res["recon_mse"], baseline)
    assert 0 < res["codebook_used"] <= 1 and res["code_perplexity"] > 2
    assert (report.eval_dir(tiny_vq_dir.workdir) / f"reconstructions_step_{res['step']}.png").exists()


def test_ema_codebook_is_updated_by_the_step_not_the_optimizer(tiny_data_dir):
    cfg = config_lib.load_config(os.path.join(REPO, "configs/vqvae_shapes.py") + ":runlocal")
    with cfg.unlocked():
        cfg.input.update(dataset="shapes_captions/tiny", data_dir=tiny_data_dir)
        cfg.model.update(channels=(8, 8, 8), embed_dim=4, num_codes=8)
    sk = trainer.skeleton(cfg)
    state, notes = trainer.fresh_state(sk, cfg)
    assert any("codebook of 8 initialised" in n for n in notes)
    q0 = jax.tree.map(np.asarray, state["params"]["quantizer"])
    batch = sharding.global_batch(next(pipeline.make_train_iterator(cfg.input, sk.family.tokenizer)), sk.mesh)
    state, _ = trainer.make_train_step(sk)(state, batch)
    q1 = jax.tree.map(np.asarray, state["params"]["quantizer"])
    decay = cfg.model.ema_decay
    # Each step: cluster_size <- decay * cluster_size + (1 - decay) * n, so the total follows in closed form.
    n_vectors = batch["image"].shape[0] * (cfg.input.image_size // 8) ** 2
    np.testing.assert_allclose(q1["cluster_size"].sum(), decay * q0["cluster_size"].sum() + (1 - decay) * n_vectors,
                               rtol=1e-5)
    assert not np.allclose(q1["codebook"], q0["codebook"])

    with cfg.unlocked():
        cfg.optim.frozen = []
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.frozen.*quantizer/codebook"):
        trainer.skeleton(cfg)


# ------------------------------------------------------------------------------------------------ MCS


def test_masked_condition_strategy_masks_at_the_configured_rates():
    B, N, mask_id = 40000, 64, 99
    p_cond, p_mask, p_null = 0.1, 0.1, 0.1
    codes = jnp.zeros((B, N), jnp.int32)
    out = np.asarray(mc_diffusion.mask_condition(jax.random.key(0), codes, mask_id, p_cond, p_mask, p_null))
    masked = out == mask_id
    per_row = masked.sum(1)
    full, partial = per_row == N, (per_row > 0) & (per_row < N)
    # Binomial bounds: 4 standard deviations. A partially masked row has 0 masked codes with prob 0.9^64
    # (~1e-3) and N with prob 0.1^64: both in the expectation.
    def within(count, p, n):
        return abs(count - n * p) <= 4 * np.sqrt(n * p * (1 - p))
    assert within(full.sum(), p_null, B), full.mean()
    assert within(partial.sum(), p_cond * (1 - (1 - p_mask) ** N), B), partial.mean()
    rate = masked[partial].mean()
    n_tok = partial.sum() * N
    assert abs(rate - p_mask / (1 - (1 - p_mask) ** N)) <= 4 * np.sqrt(p_mask * (1 - p_mask) / n_tok), rate
    kept = out[~masked]
    assert np.all(kept == 0)  # codes not masked are untouched


# ------------------------------------------------------------------------------------------------ training


def _tiny_config(data_dir: str, vq_dir: str, spec_args: str = "", overrides=()):
    cfg = config_lib.load_config(os.path.join(REPO, "configs/mc_diffusion_shapes.py") + f":runlocal,vq={vq_dir}"
                                 + (f",{spec_args}" if spec_args else ""))
    with cfg.unlocked():
        cfg.input.dataset = "shapes_captions/tiny"
        cfg.input.data_dir = data_dir
        cfg.input.train_captions = "first"  # the memorised captions are the first references
        cfg.model.denoiser.overrides.update(width=64, depth=2, num_heads=2, mlp_dim=128)
        cfg.optim.update(lr=2e-3, warmup=0, decay="constant")
        cfg.eval.at_end = False
        cfg.checkpoint.every_steps = 1000
    config_lib.apply_overrides(cfg, list(overrides))
    return cfg


@pytest.fixture(scope="module")
def memorised(tiny_data_dir, tiny_vq_dir):
    cfg = _tiny_config(tiny_data_dir, tiny_vq_dir)
    sk, state, host, losses = memorise(cfg, STEPS)
    return cfg, sk, state, host, losses


def test_loss_decreases_and_the_step_keeps_timestep_statistics(memorised):
    cfg, sk, state, _, losses = memorised
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    counts = np.asarray(state["params"]["loss_counts"])
    assert counts.sum() == STEPS * 8  # every example's timestep counted once
    assert np.all(counts >= cfg.model.diffusion.min_count)  # so importance sampling is on
    assert np.all(np.asarray(state["params"]["loss_history"]) >= 0)


@pytest.mark.parametrize("steps", [100, 10])
def test_memorised_images_decode_to_their_captions(memorised, steps):
    cfg, sk, state, host, _ = memorised
    want = [normalize_caption(r[0]) for r in host["references"]]
    images = sharding.global_batch({"image": host["image"]}, sk.mesh)
    fn = sampler_lib.make_sample_fn(sk.family, sampler_config(cfg, steps=steps))
    got = sk.family.decode(np.asarray(fn(state["params"], images, jax.random.key(3))))
    assert sum(g == w for g, w in zip(got, want)) >= 7, list(zip(got, want))


@pytest.mark.parametrize("kind", ["cfg", "mcs"])
def test_guidance_is_the_stated_combination(memorised, kind):
    """log p̃ = log_softmax(log p_weak + s (log p_cond - log p_weak)), the two passes computed apart here."""
    cfg, sk, state, host, _ = memorised
    fam, params = sk.family, state["params"]
    images = jnp.asarray(host["image"])
    x = jnp.full((8, cfg.input.max_length), fam.schedule.mask_id, jnp.int32).at[:, :3].set(5)
    t, rng, s = 40, jax.random.key(7), 2.5
    scfg = sampler_config(cfg, guidance=s, guidance_kind=kind)
    ctx = fam.sampling_context(params, {"image": images}, scfg)
    got = fam.log_x0(params, ctx, x, t, rng, scfg)
    codes = fam.image_codes(params, images)
    if kind == "cfg":
        weak_codes = jnp.full_like(codes, fam.image_tokenizer.num_codes)
    else:
        weak_codes = mc_diffusion.mask_condition(rng, codes, fam.image_tokenizer.num_codes, 1.0, scfg.mcs_mask_rate)
    tt = jnp.full((8,), t, jnp.int32)
    cond = jax.nn.log_softmax(fam._logits(params, x, tt, fam._apply(params, codes, method=mc_diffusion.MCModel.condition)))
    weak = jax.nn.log_softmax(fam._logits(params, x, tt, fam._apply(params, weak_codes,
                                                                    method=mc_diffusion.MCModel.condition)))
    want = jax.nn.log_softmax(weak + s * (cond - weak))
    np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-5)
    plain = fam.log_x0(params, ctx, x, t, rng, sampler_config(cfg, guidance=1.0))
    np.testing.assert_allclose(np.exp(plain), np.exp(cond), atol=1e-5)  # s = 1: the conditional model


def test_config_errors_name_the_field(tiny_data_dir, tiny_vq_dir):
    from ladic_jax.families.base import get_family
    bad = [("sampler.steps=101", "config.sampler.steps"), ("sampler.guidance_kind=both", "config.sampler.guidance_kind"),
           ("model.p_cond=1.5", "config.model.p_cond"), ("model.diffusion.kind=gauss", "config.model.diffusion.kind")]
    for override, field in bad:
        with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
            get_family(_tiny_config(tiny_data_dir, tiny_vq_dir, overrides=[override]))
    cfg = _tiny_config(tiny_data_dir, tiny_vq_dir)
    with cfg.unlocked():
        cfg.model.image_tokenizer.path = "/nonexistent/vq"
    with pytest.raises(FileNotFoundError, match="/nonexistent/vq"):
        get_family(cfg)


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("args", ["", "absorbing"])
def test_shapes_config_runlocal_trains_and_evaluates(args, tiny_data_dir, tiny_vq_dir, tmp_path):
    from ladic_jax.cli import train as train_cli
    workdir = str(tmp_path / "mc")
    train_cli.main(["--config", os.path.join(REPO, "configs/mc_diffusion_shapes.py")
                    + f":runlocal,vq={tiny_vq_dir}" + (f",{args}" if args else ""),
                    "--workdir", workdir, f"--config.input.data_dir={tiny_data_dir}",
                    "--config.input.dataset=shapes_captions/tiny", "--config.sampler.guidance=2.0"])
    res = report.latest_eval(workdir)
    for key in ("bleu_4", "cider", "sem_fully_correct", "dist_2"):
        assert key in res, key
    assert res["sampler"]["guidance"] == 2.0 and res["sampler"]["guidance_kind"] == "mcs"


def test_paper_config_runlocal_on_cub_captions(real_data_dir, tmp_path):
    """On cub_captions/unseen_classes built from a fake CUB in the true layout (tests/fake_datasets.py)."""
    from ladic_jax.cli import train as train_cli
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, "configs/mc_diffusion_cub.py") + ":runlocal", "--workdir", workdir,
                    f"--config.input.data_dir={real_data_dir}"])
    res = report.latest_eval(workdir)
    # Reed's two test classes of the fake CUB: 6 images, one not an image (skipped and counted).
    assert res["num_images"] == 5 and res["data/skipped_corrupt_image"] == 1 and "bleu_4" in res


def test_code_cache_holds_every_training_image_and_equals_the_encoder(tiny_data_dir, tiny_vq_dir, tmp_path):
    cfg = _tiny_config(tiny_data_dir, tiny_vq_dir)
    assert cfg.feature_cache.kind == "memory"
    sk = trainer.skeleton(cfg)
    state, _ = trainer.fresh_state(sk, cfg)
    fam, params = sk.family, state["params"]
    cache, notes = feature_cache.for_run(fam, params, sk.mesh, cfg, str(tmp_path))
    n_train = pipeline.num_eval_examples(cfg.input, "train")
    assert len(cache) == n_train and f"{n_train} training images' image_codes" in notes[0], notes
    it = pipeline.make_train_iterator(cfg.input, fam.tokenizer, start_step=3)
    for _ in range(2):
        local = next(it)
        cached = cache.attach(local)["image_codes"]
        want = fam.image_codes(params, sharding.global_batch(local, sk.mesh)["image"])
        np.testing.assert_array_equal(cached, np.asarray(want))
    with cfg.unlocked():
        cfg.input.flip = True
    with pytest.raises(config_lib.ConfigError, match=r"config.feature_cache.kind.*flip"):
        trainer.skeleton(cfg)
