"""The sampler loop's options on a tiny untrained LaDiC: Back&Refine, denoising trajectories, infilling;
and Minimum Bayes Risk selection, the config checks and the evaluation tags around them.

Untrained weights suffice: every check here is an invariant of the algorithm (what must stay equal,
which positions may change), not caption quality.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding, trainer
from ladic_jax.data import pipeline
from ladic_jax.data import text as text_lib
from ladic_jax.diffusion.gaussian import alphas_cumprod
from ladic_jax.evaluation.evaluator import mbr_sample, sampler_config
from ladic_jax.evaluation.offline import eval_tag
from ladic_jax.families.ladic import LadicModel

TEMPLATE = "a [MASK] square above a small [MASK] circle"


@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    from tiny_setup import make_tiny_config
    cfg = make_tiny_config(tiny_data_dir)
    sk = trainer.skeleton(cfg)
    state, _ = trainer.fresh_state(sk, cfg)
    host = next(pipeline.make_eval_iterator(cfg.input, sk.family.tokenizer, split="train", batch_size=8))
    return cfg, sk.family, state["params"], host["image"], sk.mesh


def _back_refine_cfg(cfg, keep, at=0.5, steps=4):
    scfg = sampler_config(cfg, steps=steps)
    scfg.back_refine.update(enabled=True, at=at, keep=keep)
    return scfg


def test_back_refine_keeping_nothing_is_plain_sampling_and_trajectory_ends_at_the_output(tiny):
    """With keep = 0 every position restarts from plain sampling's own noise and keys, so the result is
    plain sampling's (tokens, and every refine step's latent distance to the final latent); the
    trajectory's last step is the output and its latent distance there is 0."""
    cfg, fam, params, images, mesh = tiny
    batch = sharding.global_batch({"image": images}, mesh)
    key = jax.random.key(7)
    plain = jax.tree.map(np.asarray, sampler_lib.make_sample_fn(fam, sampler_config(cfg, steps=4), trajectory=True)(
        params, batch, key))
    scfg = _back_refine_cfg(cfg, keep=0.0)
    fn = sampler_lib.make_sample_fn(fam, scfg, trajectory=True)
    out = jax.tree.map(np.asarray, fn(params, batch, key))
    np.testing.assert_array_equal(out["tokens"], plain["tokens"])
    np.testing.assert_array_equal(out["step_tokens"][:, 2:], plain["step_tokens"])
    np.testing.assert_allclose(out["latent_distance"][:, 2:], plain["latent_distance"], rtol=1e-5, atol=1e-5)
    again = jax.tree.map(np.asarray, fn(params, batch, key))  # deterministic with a fixed key
    for name in out:
        np.testing.assert_array_equal(again[name], out[name])
    # 4 steps of T = 1000 are t = 999, 749, 499, 249; the first pass runs those with t >= 0.5 T.
    np.testing.assert_array_equal(sampler_lib.loop_timesteps(fam, scfg), [999, 749, 999, 749, 499, 249])
    assert out["step_tokens"].shape == (8, 6, cfg.input.max_length)
    np.testing.assert_array_equal(out["step_tokens"][:, -1], out["tokens"])
    assert out["latent_distance"].shape == (8, 6)
    np.testing.assert_array_equal(out["latent_distance"][:, -1], 0.0)
    assert np.all(out["latent_distance"][:, :-1] > 0)


def test_back_refine_keeps_exactly_the_most_confident_positions(tiny):
    """The restart state against a confidence computed here (softmax of the MLM head's logits, max) and
    x_T = sqrt(ᾱ_T) x̂0 + sqrt(1 - ᾱ_T) z at the kept positions (z: the fresh state's noise, factor 1)."""
    cfg, fam, params, images, mesh = tiny
    scfg = _back_refine_cfg(cfg, keep=0.25)
    x0_hat = jax.random.normal(jax.random.key(1), (4, cfg.input.max_length, fam.text_config.hidden_size))
    state = {"x": jax.random.normal(jax.random.key(2), x0_hat.shape), "x0_hat": x0_hat}
    fresh = {"x": jax.random.normal(jax.random.key(3), x0_hat.shape), "x0_hat": jnp.zeros_like(x0_hat)}
    out = jax.tree.map(np.asarray, fam.back_and_refine(params, {}, state, fresh, scfg))

    logits = np.asarray(fam.module.apply({"params": params}, x0_hat, method=LadicModel.decode_logits), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    confidence = (p / p.sum(-1, keepdims=True)).max(-1)
    n_keep = cfg.input.max_length // 4
    abar = alphas_cumprod(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)[-1]  # the restart is at T - 1
    assert cfg.diffusion.sample_noise_factor == 1.0
    for b in range(4):
        kept = np.zeros(cfg.input.max_length, bool)
        kept[np.argsort(-confidence[b], kind="stable")[:n_keep]] = True
        want = np.sqrt(abar) * np.asarray(x0_hat[b]) + np.sqrt(1 - abar) * np.asarray(fresh["x"][b])
        np.testing.assert_allclose(out["x"][b][kept], want[kept], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["x0_hat"][b][kept], np.asarray(x0_hat[b])[kept])
        np.testing.assert_array_equal(out["x"][b][~kept], np.asarray(fresh["x"][b])[~kept])
        np.testing.assert_array_equal(out["x0_hat"][b][~kept], 0.0)


def _template_batch(fam, cfg, images, mesh, blank_id=None):
    tokens, given = text_lib.tokenize_template(fam.tokenizer, TEMPLATE, cfg.input.max_length)
    if blank_id is not None:
        tokens = np.where(given > 0, tokens, blank_id).astype(np.int32)
    n = len(images)
    return tokens, given, sharding.global_batch(
        {"image": images, "template_tokens": np.tile(tokens, (n, 1)), "template_given": np.tile(given, (n, 1))},
        mesh)


def test_infilling_never_changes_the_given_tokens(tiny):
    cfg, fam, params, images, mesh = tiny
    tokens, given, batch = _template_batch(fam, cfg, images, mesh)
    scfg = _back_refine_cfg(cfg, keep=0.5, steps=3)  # the restart must keep the template too
    out = jax.tree.map(np.asarray, sampler_lib.make_sample_fn(fam, scfg, trajectory=True)(
        params, batch, jax.random.key(0)))
    g = given.astype(bool)
    assert np.all(out["tokens"][:, g] == tokens[g])
    assert np.all(out["step_tokens"][:, :, g] == tokens[g])
    assert np.all(out["tokens"][:, ~g] != fam.tokenizer.mask_token_id)  # the blanks were filled
    for caption in fam.decode(out["tokens"]):
        words = iter(caption.split())
        assert all(w in words for w in TEMPLATE.split() if w != "[MASK]"), caption  # in order

    # The given latents sit clean in x̂0 after every step; they do not depend on what fills the blanks
    # (the blanks are left out of the encoder's attention).
    @jax.jit
    def two_steps(batch):
        ctx = fam.sampling_context(params, batch, scfg)
        state = fam.initial_state(params, ctx, jax.random.key(1), scfg)
        x0_hats = []
        for t, tn in ((999, 666), (666, 333)):
            state = fam.denoise_step(params, ctx, state, jnp.int32(t), jnp.int32(tn), jax.random.key(t), scfg)
            x0_hats.append(state["x0_hat"])
        return ctx["given_latent"], x0_hats

    given_latent, x0_hats = jax.tree.map(np.asarray, two_steps(batch))
    for x0_hat in x0_hats:
        np.testing.assert_array_equal(x0_hat[:, g], given_latent[:, g])
    _, _, other = _template_batch(fam, cfg, images, mesh, blank_id=fam.tokenizer.convert_tokens_to_ids("dog"))
    np.testing.assert_allclose(np.asarray(two_steps(other)[0])[:, g], given_latent[:, g], rtol=1e-5, atol=1e-5)


def test_mbr_keeps_the_candidate_agreeing_most_by_pycocoevalcap_bleu():
    """The choice against mean BLEU-4 agreement computed here with pycocoevalcap's own scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    pools = [["a red circle above a small blue square", "a red circle above a big blue square",
              "a green triangle left of a yellow square", "a red circle above a small blue triangle"],
             ["a small green square", "a large yellow circle left of a small green square",
              "a yellow circle left of a small green square", "a yellow circle left of a green square"]]
    by_key = {}

    def sample(key):  # candidate c of image i is pools[i][c]; the key tells which candidate this is
        c = len(by_key)
        by_key[c] = key
        return [pool[c] for pool in pools]

    captions, chosen, _, texts = mbr_sample(sample, jax.random.key(0), 4, lambda out: out)
    assert texts == [[pool[c] for pool in pools] for c in range(4)]
    assert len({str(jax.random.key_data(k)) for k in by_key.values()}) == 4  # different noise per candidate

    def bleu4(hyp, ref):
        return Bleu(4).compute_score({0: [ref]}, {0: [hyp]}, verbose=0)[0][3]

    for pool, got, caption in zip(pools, chosen, captions):
        agreement = [np.mean([bleu4(h, r) for j, r in enumerate(pool) if j != i]) for i, h in enumerate(pool)]
        assert got == int(np.argmax(agreement)) and caption == pool[got], agreement


def test_mbr_of_identical_candidates_and_of_one_is_that_candidate():
    same = ["a red circle", "two blue squares"]
    assert mbr_sample(lambda key: list(same), jax.random.key(0), 5, lambda out: out)[:2] == (same, [0, 0])
    keys = []
    captions, chosen, outputs, _ = mbr_sample(lambda key: keys.append(key) or same, jax.random.key(3), 1,
                                              lambda out: out)
    assert captions == same and chosen == [0, 0] and len(outputs) == 1
    # n = 1 samples with the key itself: plain sampling.
    np.testing.assert_array_equal(jax.random.key_data(keys[0]), jax.random.key_data(jax.random.key(3)))


@pytest.mark.parametrize("field, value, message", [
    ("back_refine.at", 0.0, "config.sampler.back_refine.at must be a fraction"),
    ("back_refine.at", 1.5, "config.sampler.back_refine.at must be a fraction"),
    ("back_refine.keep", -0.1, "config.sampler.back_refine.keep must be the fraction"),
    ("back_refine.keep", 1.01, "config.sampler.back_refine.keep must be the fraction"),
    ("back_refine.enabled", "yes", "config.sampler.back_refine.enabled must be a bool"),
    ("mbr", 0, "config.sampler.mbr must be the number of candidates"),
    ("mbr_metric", "rouge", "config.sampler.mbr_metric must be one of"),
])
def test_bad_sampler_settings_are_rejected_naming_the_field(tiny_config, field, value, message):
    cfg = tiny_config()
    section, _, name = field.rpartition(".")
    with (cfg.sampler[section] if section else cfg.sampler).ignore_type():
        (cfg.sampler[section] if section else cfg.sampler)[name] = value
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        config_lib.validate(cfg)
    with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
        sampler_config(cfg)


def test_eval_tags_name_what_differs_from_the_run():
    base = sampler_lib.complete(config_lib.load_config(
        __import__("tiny_setup").REPO + "/configs/ladic_shapes.py").sampler)

    def tag(**changes):
        cfg = base.copy_and_resolve_references()
        for k, v in changes.items():
            section, _, name = k.rpartition("__")
            (cfg[section] if section else cfg)[name] = v
        return eval_tag(base, cfg)

    assert tag() == ""
    assert tag(steps=30) == "_s30" and tag(steps=30, guidance=2.0) == "_s30_w2"  # as before this change
    assert tag(mbr=5) == "_mbr5" and tag(mbr_metric="cider") == ""  # the metric matters only with MBR
    assert tag(mbr=5, mbr_metric="cider") == "_mbr5_mbr_metric=cider"
    assert tag(back_refine__enabled=True) == "_br0.5-0.5"
    assert tag(back_refine__keep=0.2) == ""  # Back&Refine off: its fractions do not matter
    assert tag(guidance=0.0, eta=0.5, method="renoise") == "_w0_eta=0.5_method=renoise"
    # A run saved before these fields existed gets the same tags.
    old = base.copy_and_resolve_references()
    for name in ("back_refine", "mbr", "mbr_metric"):
        del old[name]
    assert eval_tag(old, base) == "" and eval_tag(old, sampler_lib.complete(old.copy_and_resolve_references())) == ""


@pytest.mark.parametrize("null", ["learned", "zero_image"])
def test_guidance_equals_the_stated_combination_batched_or_not(tiny, null):
    """x̂0 = 2 f(x, image) - f(x, ∅) at w = 1, with ∅ computed per image the plain way (every image's tokens
    replaced by the learned null; the release's all-zero images through the ViT), against the sampler's
    context (∅ computed for one image and broadcast) with the two passes as one paired call or two calls."""
    from ladic_jax.families.base import get_family

    cfg, _, params, images, _ = tiny
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.model.null_condition = null
    fam = get_family(cfg)
    images = jnp.asarray(images)
    B = images.shape[0]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, cfg.input.max_length, fam.text_config.hidden_size)), jnp.float32)
    sc = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    apply = lambda *a, method: fam._apply(params, *a, method=method)  # noqa: E731
    img = apply(images, method=LadicModel.image_tokens)
    cond = apply(img, jnp.zeros((B,), bool), method=LadicModel.condition)
    if null == "learned":
        nullc = apply(img, jnp.ones((B,), bool), method=LadicModel.condition)
    else:
        nullc = apply(apply(jnp.zeros_like(images), method=LadicModel.image_tokens), jnp.zeros((B,), bool),
                      method=LadicModel.condition)
    tb = jnp.full((B,), 500, jnp.int32)
    f = lambda c: apply(x, tb, sc, c, method=LadicModel.denoise)  # noqa: E731
    want = np.asarray(2.0 * f(cond) - f(nullc))
    for batched in (True, False):
        scfg = sampler_config(cfg, steps=4)
        scfg.update(guidance=1.0, batch_guidance=batched)
        ctx = fam.sampling_context(params, {"image": images}, scfg)
        assert ("cond_null" in ctx) == batched and ("null" in ctx) != batched
        got = np.asarray(fam.predict_x0(params, ctx, x, jnp.int32(500), sc, scfg))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
