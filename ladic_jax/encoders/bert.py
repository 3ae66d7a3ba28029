"""BERT-family text encoder (BERT, DistilBERT, MiniLM) with an MLM head, callable on any range of layers.

LaDiC splits one pretrained BERT in the middle: embeddings + layers [0, k) encode a caption into its latent, and
layers [k, n) + the MLM head decode a latent back into tokens. `Bert` therefore exposes the pieces as methods of one
module with one set of weights:

    hidden = bert.apply(v, ids, method="embed")
    latent = bert.apply(v, hidden, mask, 0, k, method="encode")          # lower half
    logits = bert.apply(v, bert.apply(v, latent, mask, k, method="encode"), method="mlm_logits")  # upper half

The optional pooler (HF `BertModel.pooler`: tanh(dense(hidden[:, 0]))) is what `VisionTextDualEncoderModel` projects
as a text embedding (`clip.CLIP` with a `BertConfig` text tower). It has parameters only in a tree initialised through
a method that runs it (`features`, or `load_pretrained(..., pooler=True)`): `__call__` does not, so a plain BERT tree
has none.

DistilBERT and MiniLM are the same architecture (post-LayerNorm layers, learned absolute positions); DistilBERT has
no token-type embeddings (`type_vocab_size=0`). The MLM head owns its decoder kernel instead of referencing the word
embeddings, so a trainer can train the head while the embeddings stay frozen; the loader fills it from the
checkpoint's decoder weight or, for tied checkpoints, with a copy of the word embeddings.

Parameter tree (names chosen so that the HF -> Flax table in `checkpoint_names.py` reads line by line):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/layer_norm
    layers_{i}/attention/{query,key,value,out}, layers_{i}/attention_norm,
    layers_{i}/intermediate, layers_{i}/output, layers_{i}/output_norm
    mlm_head/transform, mlm_head/transform_norm, mlm_head/decoder/{kernel,bias}
    pooler/{kernel,bias}                               (only when used)

Dropout (`dropout_rate`, default 0): where HF BERT has it in training mode -- after the embedding LayerNorm, on the
attention weights, on the attention and feed-forward outputs before their residual LayerNorms -- one rate for all,
active only in methods called with `deterministic=False` (and a "dropout" rng). LaDiC's release computes its
training targets with the frozen encoder in that mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.encoders.activations import ACTIVATIONS, get_activation
from ladic_jax.encoders.attention import KERNEL_INIT, MultiHeadAttention, padding_mask
from ladic_jax.encoders.hf_config import hf_get

MODEL_TYPES = ("bert", "distilbert")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT-family encoder. `type_vocab_size=0` means no token-type embeddings (DistilBERT).

    `model_type` ("bert" or "distilbert") records which checkpoint naming the weights come from; the
    architecture is the same.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)}")
        if self.type_vocab_size < 0:
            raise ValueError(f"BertConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} unknown; known: {sorted(ACTIVATIONS)}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"BertConfig.model_type={self.model_type!r}, expected one of {MODEL_TYPES}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertConfig":
        """From a transformers `BertConfig` / `DistilBertConfig` (or their config.json dict)."""
        model_type = hf_get(hf_config, "model_type", None)
        if model_type == "bert":
            position_type = hf_get(hf_config, "position_embedding_type", "absolute")
            if position_type != "absolute":
                raise ValueError(
                    f"BERT position_embedding_type={position_type!r} is not supported (only 'absolute')"
                )
            return cls(
                vocab_size=hf_get(hf_config, "vocab_size"),
                hidden_size=hf_get(hf_config, "hidden_size"),
                num_layers=hf_get(hf_config, "num_hidden_layers"),
                num_heads=hf_get(hf_config, "num_attention_heads"),
                intermediate_size=hf_get(hf_config, "intermediate_size"),
                max_position_embeddings=hf_get(hf_config, "max_position_embeddings"),
                type_vocab_size=hf_get(hf_config, "type_vocab_size"),
                layer_norm_eps=hf_get(hf_config, "layer_norm_eps"),
                hidden_act=hf_get(hf_config, "hidden_act"),
                pad_token_id=hf_get(hf_config, "pad_token_id", 0) or 0,
                model_type="bert",
            )
        if model_type == "distilbert":
            return cls(
                vocab_size=hf_get(hf_config, "vocab_size"),
                hidden_size=hf_get(hf_config, "dim"),
                num_layers=hf_get(hf_config, "n_layers"),
                num_heads=hf_get(hf_config, "n_heads"),
                intermediate_size=hf_get(hf_config, "hidden_dim"),
                max_position_embeddings=hf_get(hf_config, "max_position_embeddings"),
                type_vocab_size=0,
                layer_norm_eps=1e-12,  # hard-coded in HF DistilBERT
                hidden_act=hf_get(hf_config, "activation"),
                pad_token_id=hf_get(hf_config, "pad_token_id", 0) or 0,
                model_type="distilbert",
            )
        raise ValueError(f"expected a BERT or DistilBERT config, got model_type={model_type!r}")

    @classmethod
    def tiny(cls, **overrides: Any) -> "BertConfig":
        """A 2-layer, 32-wide BERT for tests."""
        sizes = dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                     max_position_embeddings=64)
        return cls(**{**sizes, **overrides})

    @classmethod
    def base(cls) -> "BertConfig":
        """bert-base-uncased."""
        return cls()

    @classmethod
    def minilm_l6(cls) -> "BertConfig":
        """sentence-transformers/all-MiniLM-L6-v2 (the embedded default text model)."""
        return cls(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)

    @classmethod
    def distilbert_base(cls) -> "BertConfig":
        """distilbert-base-uncased."""
        return cls(num_layers=6, type_vocab_size=0, model_type="distilbert")


class BertEmbeddings(nn.Module):
    """Word + learned absolute position (+ token-type) embeddings, then LayerNorm (and dropout)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        c = self.config

        def embed(num: int, name: str) -> nn.Embed:
            return nn.Embed(num, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=KERNEL_INIT, name=name)

        length = input_ids.shape[1]
        hidden = embed(c.vocab_size, "word_embeddings")(input_ids)
        hidden = hidden + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(length))[None]
        if c.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            hidden = hidden + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token-type embeddings (type_vocab_size=0)")
        hidden = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="layer_norm")(hidden)
        return _dropout(hidden, self.dropout_rate, deterministic)


def _dropout(x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    return nn.Dropout(rate)(x, deterministic=False) if rate and not deterministic else x


class BertLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + attn(x)); x = LN(x + W2 act(W1 x))."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        c = self.config

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=KERNEL_INIT, name=name)

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        rate = self.dropout_rate
        attended = MultiHeadAttention(c.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                      dropout_rate=rate, name="attention")(hidden, mask, deterministic)
        hidden = norm("attention_norm")(hidden + _dropout(attended, rate, deterministic))
        intermediate = get_activation(c.hidden_act)(dense(c.intermediate_size, "intermediate")(hidden))
        out = _dropout(dense(c.hidden_size, "output")(intermediate), rate, deterministic)
        return norm("output_norm")(hidden + out)


class VocabDecoder(nn.Module):
    """Hidden (.., H) -> vocabulary logits (.., V) by its own kernel (H, V) and bias (V,).

    With `vocab_ids` (K,), only those vocabulary entries are scored (logits (.., K)) and the other columns are not
    computed: a closed-vocabulary task reads the same pretrained head.
    """

    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, vocab_ids: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", KERNEL_INIT, (hidden.shape[-1], self.vocab_size), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
        if vocab_ids is not None:
            kernel, bias = jnp.take(kernel, vocab_ids, axis=1), jnp.take(bias, vocab_ids, axis=0)
        return hidden.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class MlmHead(nn.Module):
    """BERT's masked-LM head: dense + activation + LayerNorm, then the vocabulary decoder (own kernel + bias)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, vocab_ids: jax.Array | None = None) -> jax.Array:
        c = self.config
        hidden = nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=KERNEL_INIT, name="transform")(hidden)
        hidden = get_activation(c.hidden_act)(hidden)
        hidden = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="transform_norm")(hidden)
        return VocabDecoder(c.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="decoder")(hidden, vocab_ids)


class Bert(nn.Module):
    """A BERT-family encoder whose embeddings, layer ranges and MLM head can be run separately.

    Methods (call through `apply(..., method="embed")` etc.):
      - `embed(input_ids, token_type_ids=None)` -> (B, L, H) embedding output.
      - `encode(hidden, attention_mask, start=0, end=None, return_all=False)` runs layers [start, end).
      - `mlm_logits(hidden, vocab_ids=None)` -> (B, L, vocab) MLM logits, or (B, L, K) for the K ids given.
      - `pool(hidden)` -> (B, H) HF's pooler output tanh(dense(hidden[:, 0])); `features(input_ids, attention_mask,
        token_type_ids=None)` -> (last hidden state, pooled), HF `BertModel`'s outputs (no MLM head involved).
      - `__call__(input_ids, attention_mask, token_type_ids=None)` -> MLM logits of the full model (touches every
        parameter, so it is the method to `init` with).
    """

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0  # HF's hidden and attention dropout, in `embed`/`encode` with deterministic=False

    def setup(self):
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(self.config, dropout_rate=self.dropout_rate, **kwargs)
        self.layers = [BertLayer(self.config, dropout_rate=self.dropout_rate, **kwargs)
                       for _ in range(self.config.num_layers)]
        self.mlm_head = MlmHead(self.config, **kwargs)
        self.pooler = nn.Dense(self.config.hidden_size, kernel_init=KERNEL_INIT, **kwargs)  # params only if used

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
              deterministic: bool = True) -> jax.Array:
        """Token ids (B, L) -> embeddings (B, L, H) after the embedding LayerNorm."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (batch, length), got {input_ids.dtype}{input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids shape {token_type_ids.shape} != input_ids shape {input_ids.shape}")
        return self.embeddings(input_ids, token_type_ids, deterministic)

    def encode(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array | None,
        start: int = 0,
        end: int | None = None,
        return_all: bool = False,
        deterministic: bool = True,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """Runs layers [start, end) on `hidden` (B, L, H); `attention_mask` (B, L) is 1 for tokens, 0 for padding.

        With `return_all`, also returns the states seen on the way: the input and the output of every layer run
        (end - start + 1 arrays), as HF's `hidden_states` does for the full range.
        """
        n = self.config.num_layers
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"layer range [start={start}, end={end}) is not inside [0, {n}]")
        if hidden.ndim != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden must have shape (batch, length, {self.config.hidden_size}), got {hidden.shape}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != hidden.shape[:2]:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != (batch, length) {hidden.shape[:2]}")
            mask = padding_mask(attention_mask)
        states = [hidden]
        for layer in self.layers[start:end]:
            hidden = layer(hidden, mask, deterministic)
            states.append(hidden)
        return (hidden, tuple(states)) if return_all else hidden

    def mlm_logits(self, hidden: jax.Array, vocab_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states (B, L, H) -> vocabulary logits (B, L, vocab_size).

        With `vocab_ids` (K,), only those entries are scored: logits (B, L, K), column k for token vocab_ids[k].
        """
        return self.mlm_head(hidden, vocab_ids)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states (B, L, H) -> HF's pooler output tanh(dense(hidden[:, 0])) (B, H)."""
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, token_type_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(last hidden state (B, L, H), pooled (B, H)), as HF `BertModel`'s last_hidden_state and pooler_output."""
        hidden = self.encode(self.embed(input_ids, token_type_ids), attention_mask)
        return hidden, self.pool(hidden)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        hidden = self.embed(input_ids, token_type_ids)
        return self.mlm_logits(self.encode(hidden, attention_mask))
