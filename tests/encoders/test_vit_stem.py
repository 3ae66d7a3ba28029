"""The ViT's convolutional stem (``stem="conv"``): one token per patch, translation-equivariant by whole
patches, and rejected where it cannot tile the image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.encoders import vit as vit_lib


def _config(**overrides):
    fields = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                  hidden_act="gelu", layer_norm_eps=1e-6, pre_norm=False, patch_bias=True, norm_all_tokens=True,
                  stem="conv")
    fields.update(overrides)
    return vit_lib.ViTConfig(**fields)


def _patch_tokens(params, cfg, pixels):
    """The stem's patch embeddings (B, P, H) without the class token and the position embeddings."""
    emb = vit_lib.ViTEmbeddings(cfg)
    out = emb.apply({"params": params["embeddings"]}, pixels)
    return np.asarray(out[:, 1:] - params["embeddings"]["position_embedding"][1:])


def test_conv_stem_shapes_and_parameter_tree():
    cfg = _config()
    model = vit_lib.ViT(cfg)
    pixels = jnp.zeros((2, 32, 32, 3))
    params = model.init(jax.random.key(0), pixels)["params"]
    stem = {k: v["kernel"].shape for k, v in params["embeddings"].items() if k.startswith("stem_") and "kernel" in v}
    norms = {k: v["scale"].shape for k, v in params["embeddings"].items() if k.startswith("stem_norm_")}
    assert norms == {"stem_norm_0": (8,), "stem_norm_1": (16,), "stem_norm_2": (32,)}
    # log2(8) = 3 stride-2 3x3 convolutions (each with a LayerNorm), widths doubling up to hidden_size,
    # then a 1x1 projection.
    assert stem == {"stem_0": (3, 3, 3, 8), "stem_1": (3, 3, 8, 16), "stem_2": (3, 3, 16, 32)}
    assert params["embeddings"]["patch_embedding"]["kernel"].shape == (1, 1, 32, 32)
    tokens, pooled = model.apply({"params": params}, pixels)
    assert tokens.shape == (2, cfg.num_tokens, 32) and pooled.shape == (2, 32)


def test_conv_stem_is_equivariant_to_shifts_by_whole_patches():
    """Shifting the picture by one patch shifts the patch embeddings by one grid cell, away from the
    border (where the zero padding of the convolutions differs)."""
    cfg = _config(image_size=64)
    params = vit_lib.ViT(cfg).init(jax.random.key(1), jnp.zeros((1, 64, 64, 3)))["params"]
    rng = np.random.default_rng(0)
    image = np.zeros((1, 64, 64, 3), np.float32)
    image[:, 8:48, 8:48] = rng.normal(size=(1, 40, 40, 3))
    shifted = np.roll(image, 8, axis=2)  # one patch to the right; the content stays off the border
    grid = lambda x: _patch_tokens(params, cfg, jnp.asarray(x)).reshape(8, 8, -1)  # noqa: E731
    a, b = grid(image), grid(shifted)
    np.testing.assert_allclose(b[1:7, 2:7], a[1:7, 1:6], rtol=1e-5, atol=1e-5)
    assert np.abs(b[1:7, 2:7] - b[1:7, 1:6]).max() > 1e-3  # the content did move


def test_conv_stem_needs_a_power_of_two_patch_and_a_known_stem():
    with pytest.raises(ValueError, match="stem='conv' needs a power-of-two patch_size"):
        _config(image_size=36, patch_size=12)
    with pytest.raises(ValueError, match="ViTConfig.stem='hexagon' unknown"):
        _config(stem="hexagon")
    assert vit_lib.ViTConfig.blip_b16().stem == "patch"  # pretrained towers keep the patch embedding
