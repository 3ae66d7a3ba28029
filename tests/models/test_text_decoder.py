"""The autoregressive caption decoder: its key/value cache, greedy decoding and beam search.

- One cached decoding step gives the logits of the teacher-forced forward at that position.
- The coca family's greedy decoding through the shared sampler loop (cached, one position per step) equals
  greedy decoding that re-runs the whole prefix at every step, token for token.
- Beam search with one beam is greedy; with as many beams as there are hypotheses it returns the exact best
  hypothesis under its length-normalised score, found here by enumerating every token sequence.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax import config as config_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax.evaluation.evaluator import sampler_config
from ladic_jax.families.base import get_family
from ladic_jax.families.coca import CocaModel
from ladic_jax.models.diffuser import DiffuserConfig
from ladic_jax.models.text_decoder import TextDecoder

WORDS = ("red", "circle", "square")


def test_cached_steps_equal_teacher_forcing():
    cfg = DiffuserConfig.preset("tiny", latent_dim=1, cond_dim=16, max_len=7, width=32, depth=2, num_heads=4,
                                mlp_dim=64, dropout=0.0, attention_dropout=0.0)
    dec = TextDecoder(cfg, vocab_size=11)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 11, size=(3, 7)), jnp.int32)
    image = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

    def full(d, ids, image):
        return d(ids, d.condition(image))

    params = dec.init(jax.random.key(0), ids, image, method=full)
    forced = dec.apply(params, ids, image, method=full)

    def cached(d, ids, image):
        cond, cache, out = d.condition(image), d.init_cache(ids.shape[0]), []
        for i in range(ids.shape[1]):
            logits, cache = d.step(ids[:, i], jnp.int32(i), cache, cond)
            out.append(logits)
        return jnp.stack(out, 1)

    np.testing.assert_allclose(np.asarray(dec.apply(params, ids, image, method=cached)), np.asarray(forced),
                               atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_coca():
    """A tiny coca family over a closed vocabulary of [PAD], [CLS], [SEP] and three words, with random, sharply
    peaked decoder logits (the head scaled up) so that no two candidates tie."""
    config = config_lib.load_config("configs/coca_shapes.py:runlocal")
    config.input.image_size = 16
    config.input.max_length = 5
    config.model.clip.config.vision.update(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                           intermediate_size=32)
    config.model.clip.config.text.update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                         max_position_embeddings=5)
    config.model.clip.config.projection_dim = 8
    config.model.decoder.overrides.update(width=32, depth=2, num_heads=4, mlp_dim=64)
    config.model.max_vocab = 6
    config.sampler.steps = 3
    config.eval.sampling_steps = (3,)
    family = get_family(config)
    batch = {"image": jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
             "tokens": jax.ShapeDtypeStruct((1, 5), jnp.int32),
             "token_mask": jax.ShapeDtypeStruct((1, 5), jnp.int32)}
    params = family.init(jax.random.key(1), batch)
    tok = family.tokenizer
    ids = sorted([tok.pad_token_id, tok.cls_token_id, tok.sep_token_id] + tok.convert_tokens_to_ids(list(WORDS)))
    params["vocab_ids"] = jnp.asarray(ids, jnp.float32)
    head = params["decoder"]["head"]
    params["decoder"]["head"] = {"kernel": head["kernel"] * 40.0,
                                 "bias": jnp.asarray(np.random.default_rng(3).normal(size=6), jnp.float32)}
    images = jnp.asarray(np.random.default_rng(4).normal(size=(4, 16, 16, 3)), jnp.float32)
    return family, config, params, images


def _sample(family, config, params, images, **overrides):
    cfg = sampler_config(config, **overrides)
    fn = sampler_lib.make_sample_fn(family, cfg)
    return np.asarray(fn(params, {"image": images}, jax.random.key(0)))


def _apply(family, params, *args, method):
    return family.module.apply({"params": params}, *args, method=method)


def test_cached_greedy_equals_uncached_greedy(tiny_coca):
    family, config, params, images = tiny_coca
    got = _sample(family, config, params, images, method="greedy")
    # Uncached: the whole prefix through the teacher-forced decoder at every step.
    start, end, pad = (int(x) for x in family._special_classes(params))
    img, _ = _apply(family, params, images, method=CocaModel.encode_image)
    cond = _apply(family, params, img, method=CocaModel.condition)
    ids = np.full((4, 5), pad, np.int32)
    ids[:, 0] = start
    done = np.zeros(4, bool)
    for i in range(3):
        logits = np.asarray(_apply(family, params, jnp.asarray(ids[:, :i + 1]), cond, method=CocaModel.caption_logits))
        nxt = np.where(done, pad, logits[:, i].argmax(-1))
        ids[:, i + 1] = nxt
        done |= nxt == end
    vocab = np.asarray(params["vocab_ids"]).astype(np.int32)
    np.testing.assert_array_equal(got, vocab[ids])
    assert len({tuple(r) for r in got}) > 1, "the images should not all get one caption"


def test_beam_of_one_is_greedy(tiny_coca):
    family, config, params, images = tiny_coca
    np.testing.assert_array_equal(_sample(family, config, params, images, method="beam", beam_size=1),
                                  _sample(family, config, params, images, method="greedy"))


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_exhaustive_beam_finds_the_best_hypothesis(tiny_coca, penalty):
    family, config, params, images = tiny_coca
    classes, steps = 6, 3
    got = _sample(family, config, params, images, method="beam", beam_size=classes ** steps, length_penalty=penalty)
    start, end, pad = (int(x) for x in family._special_classes(params))
    vocab = np.asarray(params["vocab_ids"]).astype(np.int32)
    seqs = np.array([[start, *s, pad] for s in itertools.product(range(classes), repeat=steps)], np.int32)
    img, _ = _apply(family, params, images, method=CocaModel.encode_image)
    for b in range(images.shape[0]):
        cond = _apply(family, params, jnp.repeat(img[b:b + 1], len(seqs), 0), method=CocaModel.condition)
        logits = _apply(family, params, jnp.asarray(seqs[:, :-1]), cond, method=CocaModel.caption_logits)
        logp = np.asarray(jax.nn.log_softmax(logits))
        best, best_tokens = -np.inf, None
        for row, seq in enumerate(seqs):
            total, length = 0.0, 0
            for i in range(steps):
                total += logp[row, i, seq[i + 1]]
                length += 1
                if seq[i + 1] == end:
                    break
            score = total / length ** penalty
            if score > best:
                hypothesis = np.full(5, pad, np.int32)
                hypothesis[: length + 1] = seq[: length + 1]
                best, best_tokens = score, hypothesis
        np.testing.assert_array_equal(got[b], vocab[best_tokens])
