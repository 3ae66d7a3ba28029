"""Vision transformer covering HF `CLIPVisionModel` and `BlipVisionModel` (and timm's BLIP ViT used by LaDiC).

The two differ in three switches, kept explicit in `ViTConfig`:

| | CLIP | BLIP |
|---|---|---|
| `pre_norm`: LayerNorm on the embeddings before the blocks | yes | no |
| `patch_bias`: bias on the patch-embedding convolution | no | yes |
| `norm_all_tokens`: final LayerNorm on every token | no (CLS only) | yes, and HF applies it a second time to the pooled CLS |
| activation, LayerNorm eps | quick_gelu, 1e-5 | exact gelu, 1e-5 in HF configs (1e-6 in timm/LaDiC) |

A fourth switch, `stem`, is not in either: `"patch"` (the default, and the only one with pretrained weights)
embeds each patch with one strided convolution; `"conv"` replaces it with a small convolutional stem
(log2(patch_size) 3x3 stride-2 convolutions, each followed by a LayerNorm over channels and GELU, widths
doubling up to `hidden_size`, then a 1x1 projection), which trains from scratch much faster on small data (Xiao et al. 2021, "Early convolutions help
transformers see better"). Both give one token per `patch_size` x `patch_size` patch.

`ViT(pixels)` takes NHWC images (B, H, W, C) of exactly `image_size` pixels and returns
`(last_hidden_state, pooled)` with HF's meaning: all tokens (CLS first), and the pooled CLS token.

Parameter tree: `embeddings/{class_embedding, position_embedding, patch_embedding/{kernel,bias}}`
(with `stem="conv"` also `embeddings/stem_{i}/{kernel,bias}` and `embeddings/stem_norm_{i}/{scale,bias}`, and `patch_embedding` is the 1x1 projection),
`pre_layer_norm` (CLIP), `layers_{i}/...` (see `pre_norm_block.py`), `post_layer_norm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.encoders.activations import ACTIVATIONS
from ladic_jax.encoders.attention import KERNEL_INIT
from ladic_jax.encoders.hf_config import hf_get
from ladic_jax.encoders.pre_norm_block import PreNormBlock

STEMS = ("patch", "conv")
_VISION_MODEL_TYPES = {"clip_vision_model": "clip", "blip_vision_model": "blip"}


def _square_size(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes and variant switches of a CLIP- or BLIP-style vision transformer (see the module docstring)."""

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pre_norm: bool = True
    patch_bias: bool = False
    norm_all_tokens: bool = False
    stem: str = "patch"

    def __post_init__(self):
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"ViTConfig.stem={self.stem!r} unknown; choose one of {STEMS}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViTConfig.stem='conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig.hidden_act={self.hidden_act!r} unknown; known: {sorted(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches + the class token."""
        return self.num_patches + 1

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ViTConfig":
        """From a transformers CLIP/BLIP vision config, or a full CLIP/BLIP config (its `vision_config`).

        An optional `stem` key ("patch" when absent, as in every HF config) selects the stem.
        """
        model_type = hf_get(hf_config, "model_type", None)
        if model_type in ("clip", "blip"):
            hf_config = hf_get(hf_config, "vision_config")
            model_type = hf_get(hf_config, "model_type", f"{model_type}_vision_model")
        if model_type not in _VISION_MODEL_TYPES:
            raise ValueError(
                f"expected a CLIP or BLIP vision config, got model_type={model_type!r}; "
                f"known: {sorted(_VISION_MODEL_TYPES)} (or 'clip'/'blip')"
            )
        blip = _VISION_MODEL_TYPES[model_type] == "blip"
        return cls(
            image_size=_square_size(hf_get(hf_config, "image_size"), "image_size"),
            patch_size=_square_size(hf_get(hf_config, "patch_size"), "patch_size"),
            num_channels=hf_get(hf_config, "num_channels", 3),
            hidden_size=hf_get(hf_config, "hidden_size"),
            num_layers=hf_get(hf_config, "num_hidden_layers"),
            num_heads=hf_get(hf_config, "num_attention_heads"),
            intermediate_size=hf_get(hf_config, "intermediate_size"),
            hidden_act=hf_get(hf_config, "hidden_act"),
            layer_norm_eps=hf_get(hf_config, "layer_norm_eps"),
            pre_norm=not blip,
            patch_bias=blip,
            norm_all_tokens=blip,
            stem=hf_get(hf_config, "stem", "patch"),  # our key, written by `export_clip` for a conv stem only
        )

    @classmethod
    def clip_b32(cls) -> "ViTConfig":
        """openai/clip-vit-base-patch32 vision tower."""
        return cls()

    @classmethod
    def clip_b16(cls) -> "ViTConfig":
        """openai/clip-vit-base-patch16 vision tower."""
        return cls(patch_size=16)

    @classmethod
    def blip_b16(cls, image_size: int = 384, layer_norm_eps: float = 1e-5) -> "ViTConfig":
        """BLIP ViT-B/16 (HF Salesforce/blip-* configs: 384 px, eps 1e-5; LaDiC's timm copy: 224 px, eps 1e-6)."""
        return cls(image_size=image_size, patch_size=16, hidden_act="gelu", layer_norm_eps=layer_norm_eps,
                   pre_norm=False, patch_bias=True, norm_all_tokens=True)

    @classmethod
    def tiny(cls, variant: str = "clip", **overrides: Any) -> "ViTConfig":
        """A 2-layer, 32-wide ViT on 32 px images with 8 px patches, in the "clip" or "blip" variant."""
        if variant not in ("clip", "blip"):
            raise ValueError(f"variant must be 'clip' or 'blip', got {variant!r}")
        sizes = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)
        if variant == "blip":
            sizes.update(hidden_act="gelu", pre_norm=False, patch_bias=True, norm_all_tokens=True)
        return cls(**{**sizes, **overrides})


class ViTEmbeddings(nn.Module):
    """Patch embedding (a strided convolution) with a class token prepended and learned positions added."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        batch = pixels.shape[0]
        if c.stem == "conv":
            x, width = pixels, c.hidden_size // (c.patch_size // 2)
            for i in range(c.patch_size.bit_length() - 1):  # log2(patch_size) halvings
                x = nn.Conv(max(width, 8), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"stem_{i}")(x)
                x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"stem_norm_{i}")(x)
                x, width = nn.gelu(x, approximate=False), width * 2
            kernel = (1, 1)
        else:
            x, kernel = pixels, (c.patch_size, c.patch_size)
        patches = nn.Conv(
            c.hidden_size, kernel, strides=kernel, padding="VALID",
            use_bias=c.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT,
            name="patch_embedding",
        )(x)
        patches = patches.reshape(batch, c.num_patches, c.hidden_size)  # row-major over the patch grid, like HF
        cls_token = self.param("class_embedding", KERNEL_INIT, (c.hidden_size,), self.param_dtype)
        positions = self.param("position_embedding", KERNEL_INIT, (c.num_tokens, c.hidden_size), self.param_dtype)
        cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, c.hidden_size))
        return jnp.concatenate([cls_token, patches], axis=1) + positions.astype(self.dtype)[None]


class ViT(nn.Module):
    """CLIP/BLIP vision transformer: NHWC pixels -> (all tokens (B, 1+P, H), pooled CLS (B, H)).

    `return_all=True` adds a third output, the tuple of hidden states entering each block plus the output of the
    last block (num_layers + 1 arrays, before the final LayerNorm), like HF's `hidden_states`.
    """

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, return_all: bool = False, normalize_tokens: bool = False):
        """``normalize_tokens``: apply the final LayerNorm to every token, also where the variant (CLIP) applies
        it to the pooled CLS token only; the pooled output is unchanged (it is then the first token)."""
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NHWC (batch, {c.image_size}, {c.image_size}, {c.num_channels}), "
                f"got shape {pixel_values.shape}"
            )

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        hidden = ViTEmbeddings(c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(
            pixel_values.astype(self.dtype))
        if c.pre_norm:
            hidden = norm("pre_layer_norm")(hidden)
        states = [hidden]
        for i in range(c.num_layers):
            block = PreNormBlock(c.num_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                                 dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")
            hidden = block(hidden)
            states.append(hidden)
        post_norm = norm("post_layer_norm")
        if c.norm_all_tokens:
            hidden = post_norm(hidden)
            pooled = post_norm(hidden[:, 0])
        elif normalize_tokens:
            hidden = post_norm(hidden)
            pooled = hidden[:, 0]
        else:
            pooled = post_norm(hidden[:, 0])
        return (hidden, pooled, tuple(states)) if return_all else (hidden, pooled)

