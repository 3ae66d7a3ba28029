"""The LaDiC family's auxiliary image-words loss and input scaling against formulas written out here."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from tiny_setup import make_tiny_config  # noqa: E402

from ladic_jax import trainer  # noqa: E402
from ladic_jax.families.ladic import LadicModel  # noqa: E402


@pytest.fixture(scope="module")
def family_and_params():
    cfg = make_tiny_config("/nonexistent", ["model.image_words_weight=0.5"])
    family = trainer.get_family(cfg)
    params = family.init(jax.random.key(0), trainer.dummy_batch(cfg, 2))
    tok = family.tokenizer
    words = ["a", "red", "circle", "square", "above", "big", "blue"]
    ids = [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, family._period_id] + tok.convert_tokens_to_ids(words)
    vocab = np.full(family.vocab_size, tok.pad_token_id, np.float32)
    vocab[: len(ids)] = ids
    params = {**params, "vocab_ids": jnp.asarray(vocab)}
    return cfg, family, params, ids


def test_image_words_loss_is_bce_against_the_caption_word_set(family_and_params):
    cfg, family, params, ids = family_and_params
    tok = family.tokenizer
    L = cfg.input.max_length
    captions = ["a red circle above a big blue square", "a blue square"]
    enc = tok(captions, padding="max_length", max_length=L, truncation=True, return_tensors="np")
    batch = {"tokens": jnp.asarray(enc["input_ids"], jnp.int32),
             "token_mask": jnp.asarray(enc["attention_mask"], jnp.int32),
             "image": jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))}
    _, metrics = family.loss(params, batch, jax.random.key(2), train=False)

    img = family.module.apply({"params": params}, batch["image"], method=LadicModel.image_tokens)
    logits = np.asarray(family.module.apply({"params": params}, img, method=LadicModel.image_word_logits),
                        np.float64)
    assert logits.shape == (2, family.vocab_size)
    expected = []
    for b, caption in enumerate(captions):
        present = np.zeros(family.vocab_size)
        for word in caption.split():  # every word here is one WordPiece token in the closed vocabulary
            present[ids.index(tok.convert_tokens_to_ids(word))] = 1.0
        z = logits[b]
        bce = np.maximum(z, 0) - z * present + np.log1p(np.exp(-np.abs(z)))
        expected.append(bce.sum())
    assert float(metrics["image_words"]) == pytest.approx(np.mean(expected), rel=1e-5)


def test_image_words_off_adds_no_parameters():
    cfg = make_tiny_config("/nonexistent", ["model.image_words_weight=0.0"])
    family = trainer.get_family(cfg)
    params = jax.eval_shape(lambda: family.init(jax.random.key(0), trainer.dummy_batch(cfg, 1)))
    assert "image_words_head" not in params
