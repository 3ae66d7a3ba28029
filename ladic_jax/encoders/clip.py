"""CLIP: text transformer + vision transformer + projections, matching HF `CLIPModel` (or, with a BERT text tower,
HF `VisionTextDualEncoderModel` with a CLIP vision tower).

Used by CLIP-DiffusionLM and Prefix-diffusion for image features, and by every family for CLIPScore and
candidate re-ranking. Semantics follow transformers 5:

- `get_image_features(pixels)` / `get_text_features(ids, mask)` return the *projected, unnormalised* pooled
  features (HF returns them as `pooler_output` of the `get_*_features` output).
- `__call__(ids, pixels, mask)` returns `logits_per_image` (images x texts) = exp(logit_scale) * cosine.
- Text pooling takes the hidden state at the end-of-text token: if the config's `eos_token_id` is 2 (configs
  saved before transformers PR #24773) the position of the largest token id, otherwise the first position holding
  `eos_token_id`. The text tower is causal, and padding (attention_mask 0) is masked as well.
- With `CLIPConfig.text` a `BertConfig` (model_type "bert", e.g. MiniLM), the text tower is `bert.Bert` and the pooled
  text state is BERT's pooler output tanh(dense(hidden[:, 0])), as `VisionTextDualEncoderModel` takes it; projections
  (no bias) and the logit scale (exp, unclamped) are the same.

Pixels are NHWC, already resized and normalised (CLIP mean/std).
Parameter tree: `text_model/{embeddings/{token_embedding,position_embedding}, layers_{i}, final_layer_norm}`,
`vision_model/...` (see `vit.py`), `text_projection/kernel`, `visual_projection/kernel`, `logit_scale`. A BERT text
tower has `text_model/{embeddings/..., layers_{i}/..., pooler}` (see `bert.py`; no MLM head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.encoders.activations import ACTIVATIONS
from ladic_jax.encoders.attention import KERNEL_INIT, causal_mask, padding_mask
from ladic_jax.encoders.bert import Bert, BertConfig
from ladic_jax.encoders.hf_config import hf_get
from ladic_jax.encoders.pre_norm_block import PreNormBlock
from ladic_jax.encoders.vit import ViT, ViTConfig

# transformers keeps the old argmax pooling for configs whose eos_token_id is this legacy value.
_LEGACY_EOS_TOKEN_ID = 2
DUAL_ENCODER_MODEL_TYPE = "vision-text-dual-encoder"  # HF `VisionTextDualEncoderConfig.model_type`


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Sizes of the CLIP text tower (defaults: openai/clip-vit-base-patch32)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r} unknown; known: {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf_text_config: Any) -> "CLIPTextConfig":
        eos = hf_get(hf_text_config, "eos_token_id")
        if isinstance(eos, (list, tuple)):
            raise ValueError(f"CLIP text config has several eos_token_id {eos}; expected one")
        return cls(
            vocab_size=hf_get(hf_text_config, "vocab_size"),
            hidden_size=hf_get(hf_text_config, "hidden_size"),
            num_layers=hf_get(hf_text_config, "num_hidden_layers"),
            num_heads=hf_get(hf_text_config, "num_attention_heads"),
            intermediate_size=hf_get(hf_text_config, "intermediate_size"),
            max_position_embeddings=hf_get(hf_text_config, "max_position_embeddings"),
            hidden_act=hf_get(hf_text_config, "hidden_act"),
            layer_norm_eps=hf_get(hf_text_config, "layer_norm_eps"),
            eos_token_id=eos,
        )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: text tower (CLIP's, or a BERT's), vision tower, shared projection width, initial logit scale."""

    text: CLIPTextConfig | BertConfig = CLIPTextConfig()
    vision: ViTConfig = ViTConfig.clip_b32()
    projection_dim: int = 512
    logit_scale_init: float = 2.6592

    def __post_init__(self):
        if isinstance(self.text, BertConfig) and self.text.model_type != "bert":
            raise ValueError(f"a BERT text tower must have model_type 'bert' (HF's {self.text.model_type} has no "
                             "pooler for VisionTextDualEncoderModel to project)")

    @property
    def bert_text(self) -> bool:
        """True if the text tower is a BERT (the model is then HF's `VisionTextDualEncoderModel`)."""
        return isinstance(self.text, BertConfig)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPConfig":
        """From a transformers `CLIPConfig`, or a `VisionTextDualEncoderConfig` with CLIP vision and BERT text
        configs (or their config.json dicts)."""
        model_type = hf_get(hf_config, "model_type", None)
        if model_type == DUAL_ENCODER_MODEL_TYPE:
            text, vision = hf_get(hf_config, "text_config"), hf_get(hf_config, "vision_config")
            types = (hf_get(text, "model_type", None), hf_get(vision, "model_type", None))
            if types != ("bert", "clip_vision_model"):
                raise ValueError(f"only a dual encoder of a BERT text and a CLIP vision tower is supported; its "
                                 f"text/vision model_types are {types}")
            return cls(text=BertConfig.from_hf(text), vision=ViTConfig.from_hf(vision),
                       projection_dim=hf_get(hf_config, "projection_dim"),
                       logit_scale_init=hf_get(hf_config, "logit_scale_init_value", 2.6592))
        if model_type != "clip":
            raise ValueError(f"expected a CLIP config (model_type 'clip' or {DUAL_ENCODER_MODEL_TYPE!r}), got "
                             f"model_type={model_type!r}")
        text = hf_get(hf_config, "text_config")
        if isinstance(text, dict):
            text = {"model_type": "clip_text_model", **text}
        vision = hf_get(hf_config, "vision_config")
        if isinstance(vision, dict):
            vision = {"model_type": "clip_vision_model", **vision}
        return cls(
            text=CLIPTextConfig.from_hf(text),
            vision=ViTConfig.from_hf(vision),
            projection_dim=hf_get(hf_config, "projection_dim"),
            logit_scale_init=hf_get(hf_config, "logit_scale_init_value", 2.6592),
        )

    @classmethod
    def tiny(cls) -> "CLIPConfig":
        """2-layer, 32-wide towers, 32 px images, projection 16: for tests."""
        text = CLIPTextConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                              max_position_embeddings=24, eos_token_id=98)
        return cls(text=text, vision=ViTConfig.tiny("clip"), projection_dim=16)


class CLIPTextTransformer(nn.Module):
    """Causal text tower: ids (B, L) [+ mask] -> (all tokens after the final LayerNorm, pooled EOS state)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, return_all: bool = False):
        c = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (batch, length), got {input_ids.dtype}{input_ids.shape}")
        batch, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"input_ids length {length} exceeds max_position_embeddings={c.max_position_embeddings}")

        hidden = EmbeddingsWithPositions(c.vocab_size, c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name="embeddings")(input_ids)
        mask = causal_mask(length)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
            mask = mask & padding_mask(attention_mask)
        states = [hidden]
        for i in range(c.num_layers):
            hidden = PreNormBlock(c.num_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"layers_{i}")(hidden, mask)
            states.append(hidden)
        hidden = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="final_layer_norm")(hidden)
        if c.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first occurrence
        pooled = hidden[jnp.arange(batch), eos_position]
        return (hidden, pooled, tuple(states)) if return_all else (hidden, pooled)


class EmbeddingsWithPositions(nn.Module):
    """CLIP text embeddings: token embedding + learned absolute position embedding (no LayerNorm)."""

    vocab_size: int
    max_positions: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=KERNEL_INIT)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kwargs)(input_ids)
        positions = nn.Embed(self.max_positions, self.hidden_size, name="position_embedding", **kwargs)(
            jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


def _normalize(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 / jnp.linalg.norm(x32, axis=-1, keepdims=True)


class CLIP(nn.Module):
    """HF `CLIPModel` in Flax (see the module docstring for the exact output semantics)."""

    config: CLIPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = Bert(c.text, **kwargs) if c.bert_text else CLIPTextTransformer(c.text, **kwargs)
        self.vision_model = ViT(c.vision, **kwargs)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, kernel_init=KERNEL_INIT, **kwargs)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, kernel_init=KERNEL_INIT, **kwargs)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init), (),
                                      self.param_dtype)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """NHWC pixels -> projected pooled image features (B, projection_dim), not normalised."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Token ids (B, L) -> projected pooled text features (B, projection_dim), not normalised."""
        tower = self.text_model.features if self.config.bert_text else self.text_model
        _, pooled = tower(input_ids, attention_mask)
        return self.text_projection(pooled)

    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """logits_per_image (n_images, n_texts) = exp(logit_scale) * cos(image_i, text_j), in float32."""
        image = _normalize(self.get_image_features(pixel_values))
        text = _normalize(self.get_text_features(input_ids, attention_mask))
        return jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T
