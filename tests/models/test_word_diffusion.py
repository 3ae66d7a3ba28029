"""CLIP-DiffusionLM and Prefix-diffusion (the shared word-embedding diffusion): each loss term against a
closed form on tiny inputs, rounding / clamping against a brute-force nearest neighbour, the families'
loss sums, condition fusion, and candidate re-ranking against a known score matrix."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax.diffusion.gaussian import alphas_cumprod
from ladic_jax.evaluation import evaluator as evaluator_lib
from ladic_jax.evaluation import metrics
from ladic_jax.families import base
from ladic_jax.families import word_diffusion as wd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_x0_loss_closed_form():
    # Per example the mean of squares over (L, D); at t = 0 against the clean embeddings instead.
    x0_hat = np.zeros((2, 2, 2), np.float32)
    x_start = np.full((2, 2, 2), 2.0, np.float32)
    emb = np.full((2, 2, 2), 1.0, np.float32)
    got = wd.x0_loss(jnp.asarray(x0_hat), jnp.asarray(x_start), jnp.asarray(emb), jnp.asarray([5, 0]))
    np.testing.assert_allclose(np.asarray(got), [4.0, 1.0])


def test_token_nll_closed_form():
    # Logits (0, log 3) over two classes: p = (1/4, 3/4); targets (1, 0): -(log 3/4 + log 1/4) / 2 per example.
    logits = jnp.asarray([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    got = float(wd.token_nll(logits, jnp.asarray([[1, 0]]))[0])
    assert got == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, rel=1e-6)


def test_prior_loss_closed_form():
    x = jnp.asarray([[[3.0, 4.0]]])
    abar = 0.01
    assert float(wd.prior_loss(x, jnp.float32(abar))[0]) == pytest.approx(abar * (9 + 16) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------- the families


def _family(name: str, overrides=()):
    path = {"clip_diffusionlm": "configs/clip_diffusionlm_shapes.py",
            "prefix_diffusion": "configs/prefix_diffusion_shapes.py"}[name]
    cfg = config_lib.load_config(os.path.join(REPO, path) + ":runlocal")
    with cfg.unlocked():
        cfg.model.text.pretrained = None  # no checkpoint needed to build the model
    config_lib.apply_overrides(cfg, list(overrides))
    return base.get_family(cfg)


def _terms_inputs(seed=0):
    r = np.random.default_rng(seed)
    x0_hat, x_start, emb = (r.normal(size=(3, 4, 5)).astype(np.float32) for _ in range(3))
    logits_hat, logits_start = (r.normal(size=(3, 4, 7)).astype(np.float32) for _ in range(2))
    targets = r.integers(0, 7, size=(3, 4))
    t = np.asarray([0, 10, 999])
    return dict(x0_hat=x0_hat, x_start=x_start, emb=emb, t=t, logits_hat=logits_hat, logits_start=logits_start,
                targets=targets)


def _nll(logits, targets):
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    return np.mean(logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0], -1)


def _mse(t, x0_hat, x_start, emb):
    target = np.where((t == 0)[:, None, None], emb, x_start)
    return np.mean((x0_hat.astype(np.float64) - target) ** 2, (1, 2))


def test_clip_diffusionlm_loss_is_mse_plus_lambda_rounding():
    fam = _family("clip_diffusionlm", ["model.rounding_weight=0.3"])
    a = _terms_inputs()
    terms = {k: np.asarray(v) for k, v in fam.loss_terms(**{k: jnp.asarray(v) for k, v in a.items()}).items()}
    assert set(terms) == {"x0_mse", "rounding_ce"}
    np.testing.assert_allclose(terms["x0_mse"], _mse(a["t"], a["x0_hat"], a["x_start"], a["emb"]), rtol=1e-5)
    np.testing.assert_allclose(terms["rounding_ce"], 0.3 * _nll(a["logits_hat"], a["targets"]), rtol=1e-5)


def test_prefix_diffusion_loss_is_mse_decoder_nll_and_prior():
    fam = _family("prefix_diffusion")
    a = _terms_inputs(1)
    terms = {k: np.asarray(v) for k, v in fam.loss_terms(**{k: jnp.asarray(v) for k, v in a.items()}).items()}
    assert set(terms) == {"x0_mse", "decoder_nll", "prior"}
    abar_T = alphas_cumprod("trunc_lin", 1000)[-1]
    np.testing.assert_allclose(terms["x0_mse"], _mse(a["t"], a["x0_hat"], a["x_start"], a["emb"]), rtol=1e-5)
    # The decoder NLL scores the head on x_start (not on the prediction).
    np.testing.assert_allclose(terms["decoder_nll"], _nll(a["logits_start"], a["targets"]), rtol=1e-5)
    np.testing.assert_allclose(terms["prior"], abar_T * np.mean(a["x_start"].astype(np.float64) ** 2, (1, 2)),
                               rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = wd.WordDenoiserConfig(emb_dim=6, max_len=5, width=16, depth=1, num_heads=2, mlp_dim=32,
                                num_cond_tokens=2, cond_hidden=8, dropout=0.0)
    from ladic_jax.encoders.clip import CLIPConfig
    model = wd.WordDiffusionModel(CLIPConfig.tiny(), cfg, vocab_size=11, closed_vocab=0)
    clip = CLIPConfig.tiny()
    tokens = jnp.zeros((2, 5), jnp.int32)
    image = jnp.zeros((2, clip.vision.image_size, clip.vision.image_size, 3))
    params = model.init(jax.random.key(0), tokens, jnp.ones_like(tokens), image)["params"]
    return model, params


def test_rounding_returns_the_nearest_embedding(tiny_model):
    model, params = tiny_model
    params = dict(params, emb_scale=jnp.float32(2.5))  # rounding happens in the scaled space
    table = np.asarray(params["words"]["embedding"], np.float64) / 2.5
    x = np.random.default_rng(0).normal(size=(2, 5, 6)) * 0.5
    index, nearest = model.apply({"params": params}, jnp.asarray(x, jnp.float32), method=wd.WordDiffusionModel.round)
    want = np.argmin(((x[:, :, None, :] - table[None, None]) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(np.asarray(index), want)
    np.testing.assert_allclose(np.asarray(nearest), table[want], rtol=1e-6)
    # An embedding rounds (clamps) to itself.
    index, _ = model.apply({"params": params}, jnp.asarray(table[None, [3, 7, 0]], jnp.float32),
                           method=wd.WordDiffusionModel.round)
    np.testing.assert_array_equal(np.asarray(index), [[3, 7, 0]])


def test_tied_head_logits(tiny_model):
    model, params = tiny_model
    params = dict(params, emb_scale=jnp.float32(2.0), head_bias=jnp.arange(11, dtype=jnp.float32))
    x = np.random.default_rng(1).normal(size=(1, 5, 6)).astype(np.float32)
    got = model.apply({"params": params}, jnp.asarray(x), method=wd.WordDiffusionModel.logits)
    table = np.asarray(params["words"]["embedding"]) / 2.0
    np.testing.assert_allclose(np.asarray(got), x @ table.T + np.arange(11), rtol=1e-5, atol=1e-5)


def test_denoiser_fusions_read_the_condition():
    """``concat`` attends to the condition tokens, ``add`` adds them to every position; both change the output
    when the condition changes, and concat's output has only the text positions."""
    for fusion in wd.FUSIONS:
        cfg = wd.WordDenoiserConfig(emb_dim=6, max_len=5, width=16, depth=1, num_heads=2, mlp_dim=32,
                                    num_cond_tokens=3, cond_hidden=8, dropout=0.0, fusion=fusion)
        net = wd.WordDenoiser(cfg)
        x = jax.random.normal(jax.random.key(0), (2, 5, 6))
        t = jnp.asarray([1, 500])
        c1 = jax.random.normal(jax.random.key(1), (2, 3, 16))
        params = net.init(jax.random.key(2), x, t, c1)
        out1, out2 = net.apply(params, x, t, c1), net.apply(params, x, t, 2 * c1 + 1)
        assert out1.shape == (2, 5, 6)
        # Exactly equal if the condition were ignored (at init its effect through attention is small).
        assert float(jnp.max(jnp.abs(out1 - out2))) > 1e-7
        names = set(params["params"])
        assert ("cond_position_embeddings" in names) == (fusion == "concat")


# ------------------------------------------------------------------------------------------- re-ranking


def test_select_by_score_picks_the_row_argmax():
    scores = np.array([[0.1, 0.9, 0.3], [0.5, 0.5, 0.2], [-1.0, -2.0, -0.5]])
    assert metrics.select_by_score(scores) == [1, 0, 2]  # ties to the first
    with pytest.raises(ValueError, match="finite"):
        metrics.select_by_score(np.array([[np.nan, 1.0]]))


class _FakeScorer:
    """text_embeddings by a lookup table: caption "cK" is the unit vector e_K."""

    def text_embeddings(self, texts):
        return np.stack([np.eye(4)[int(t[1:])] for t in texts])


def test_clip_ranker_keeps_the_candidate_of_highest_cosine():
    image_emb = np.array([[0.0, 0.6, 0.8, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rank = evaluator_lib.clip_ranker(_FakeScorer(), image_emb)
    # Image 0: cosines (c0, c1, c2) = (0, 0.6, 0.8) -> 2; image 1: (c3, c0, c1) = (0, 1, 0) -> 1.
    assert rank([["c0", "c1", "c2"], ["c3", "c0", "c1"]]) == [2, 1]


def test_mbr_sample_with_clip_metric_uses_the_ranker():
    outs = {0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]}
    calls = []

    def sample(key):
        c = 0 if len(calls) == 0 else len(calls)
        calls.append(key)
        return outs[c]

    def rank(pools):
        assert pools == [["a", "c", "e"], ["b", "d", "f"]]
        return [2, 0]

    captions, chosen, _, _ = evaluator_lib.mbr_sample(sample, jax.random.key(0), 3, list, "clip", rank)
    assert captions == ["e", "b"] and chosen == [2, 0]
    with pytest.raises(ValueError, match="needs a CLIP"):
        evaluator_lib.mbr_sample(lambda k: ["a"], jax.random.key(0), 2, list, "clip", None)


def test_clip_text_guidance_combines_conditional_and_null_predictions():
    """With ``model.text_guidance`` the loss trains a second condition token from the caption's CLIP text
    feature (or a learned null), and a sampling step with guidance w takes (1 + w) f(x, image, image-as-text)
    - w f(x, image, null) before its DDIM update."""
    fam = _family("clip_diffusionlm", ["model.text_guidance=True", "model.uncond_prob=0.5", "sampler.guidance=1.5",
                                       "sampler.method=refeed", "sampler.clamp=False", "model.denoiser.width=32",
                                       "model.denoiser.depth=1", "model.denoiser.num_heads=2",
                                       "model.denoiser.mlp_dim=64", "model.denoiser.cond_hidden=16"])
    cfg = fam.config
    size = cfg.input.image_size
    batch = {"image": jax.random.normal(jax.random.key(0), (2, size, size, 3)),
             "tokens": jnp.asarray([[101, 1037, 2417, 102] + [0] * (cfg.input.max_length - 4)] * 2, jnp.int32)}
    batch["token_mask"] = (batch["tokens"] > 0).astype(jnp.int32)
    params = fam.init(jax.random.key(1), batch)
    assert params["null_text"].shape == (1, 32) and "text_condition" in params
    loss, metrics = fam.loss(params, batch, jax.random.key(2))
    assert np.isfinite(float(loss)) and set(metrics) >= {"x0_mse", "rounding_ce"}
    from ladic_jax.evaluation.evaluator import sampler_config
    scfg = sampler_config(cfg)
    scfg.batch_guidance = False
    ctx = fam.sampling_context(params, batch, scfg)
    assert ctx["cond"].shape == ctx["null"].shape == (2, 2, 32)  # image token + text slot
    x = jax.random.normal(jax.random.key(3), (2, cfg.input.max_length, 384))
    t = jnp.full((2,), 999, jnp.int32)
    f = lambda cond: fam.module.apply({"params": params}, x, t, cond, method=wd.WordDiffusionModel.denoise)  # noqa: E731
    want = 2.5 * f(ctx["cond"]) - 1.5 * f(ctx["null"])
    assert not np.allclose(np.asarray(f(ctx["cond"])), np.asarray(f(ctx["null"])))
    for batched in (False, True):  # two calls, or one call on paired rows
        scfg.batch_guidance = batched
        ctx = fam.sampling_context(params, batch, scfg)
        state = fam.denoise_step(params, ctx, {"x": x, "x0_hat": jnp.zeros_like(x)}, 999, 799, jax.random.key(4), scfg)
        np.testing.assert_allclose(np.asarray(state["x"]), np.asarray(want), rtol=1e-5, atol=1e-5)  # refeed: x = x̂0
