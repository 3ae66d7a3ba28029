"""An autoregressive caption decoder with cross-attention to image tokens, and its key/value cache.

The blocks are the diffuser's own (``DiffuserBlock``: self-attention, cross-attention to the image tokens,
MLP), made causal, and the sizes are the diffuser's presets (``DiffuserConfig``; ``latent_dim`` and the
time/input/output switches are unused): an autoregressive baseline of the same depth and width as a
diffusion denoiser, which is what the papers' speed claims compare against.

    h_0 = embed_norm(token_embedding[ids] + position_embeddings[:L])
    h   = blocks (causal self-attention, cross-attention, MLP) -> final_norm (pre-LN) -> head -> logits

Teacher forcing (``__call__``) scores every position at once under a causal mask. Decoding one token at a
time (``step``) keeps, per block, the self-attention keys and values of the positions already decoded in
a cache of fixed length ``max_len``; a step computes only the new position's and attends over the cache
with the positions after it masked, so each new token costs one position, not the whole prefix. The
image's cross-attention keys/values (``condition``) are computed once per image, as for the diffuser.

Parameters: ``token_embedding`` (vocab, width), ``position_embeddings`` (max_len, width), ``embed_norm``,
``block_{i}/...`` (see ``diffuser.py``), ``final_norm`` (pre-LN), ``head/{kernel,bias}`` (width, vocab).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.models.diffuser import CrossKV, DiffuserBlock, DiffuserConfig

Cache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per block, the self-attention (keys, values) of every position, each (B, max_len, heads, head_dim)."""


class TextDecoder(nn.Module):
    """Causal transformer decoder over ``vocab_size`` token classes, cross-attending to image tokens."""

    config: DiffuserConfig
    vocab_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(self.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02),
                                        name="token_embedding", **kw)
        self.position_embeddings = self.param("position_embeddings", nn.initializers.normal(c.position_init_std),
                                              (c.max_len, c.width), self.param_dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, **kw)
        self.embed_norm = norm(name="embed_norm")
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = [DiffuserBlock(c, name=f"block_{i}", **kw) for i in range(c.depth)]
        if c.block_norm == "pre":
            self.final_norm = norm(name="final_norm")
        self.head = nn.Dense(self.vocab_size, name="head", **kw)

    def condition(self, image_tokens: jax.Array) -> CrossKV:
        """Every block's cross-attention keys/values for image tokens (B, N, cond_dim), computed once."""
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != self.config.cond_dim:
            raise ValueError(f"image_tokens must have shape (batch, tokens, {self.config.cond_dim}), "
                             f"got {image_tokens.shape}")
        return tuple(block.cross_key_value(image_tokens.astype(self.dtype)) for block in self.blocks)

    def _embed(self, ids: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        h = self.token_embedding(ids) + self.position_embeddings[positions].astype(self.dtype)
        return self.embed_dropout(self.embed_norm(h), deterministic=deterministic)

    def _logits(self, h: jax.Array) -> jax.Array:
        if self.config.block_norm == "pre":
            h = self.final_norm(h)
        return self.head(h).astype(jnp.float32)

    def __call__(self, ids: jax.Array, cond: CrossKV, deterministic: bool = True) -> jax.Array:
        """Teacher forcing: logits (B, L, vocab) float32, position i predicting token i + 1 from ids[:, :i+1]."""
        length = ids.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"ids have length {length}, more than the decoder's max_len {self.config.max_len}")
        h = self._embed(ids, jnp.arange(length), deterministic)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        for block, kv in zip(self.blocks, cond):
            h = block(h, kv, deterministic, mask=causal)
        return self._logits(h)

    def init_cache(self, batch: int) -> Cache:
        """An empty cache for ``batch`` sequences (zeros; positions not yet decoded are masked out)."""
        c = self.config
        heads, head_dim = c.num_heads, c.width // c.num_heads  # keys (B, H, D, N), values (B, H, N, D): Attention's
        return tuple((jnp.zeros((batch, heads, head_dim, c.max_len), self.dtype),
                      jnp.zeros((batch, heads, c.max_len, head_dim), self.dtype)) for _ in range(c.depth))

    def step(self, ids: jax.Array, position: jax.Array, cache: Cache, cond: CrossKV) -> tuple[jax.Array, Cache]:
        """One decoding step: the tokens (B,) at ``position`` (a scalar int) -> logits (B, vocab) for the next
        position, and the cache with this position's keys/values written in."""
        h = self._embed(ids[:, None], position[None], True)
        visible = (jnp.arange(self.config.max_len) <= position)[None, None, None, :]
        new_cache = []
        for block, kv, (keys, values) in zip(self.blocks, cond, cache):
            k, v = block.self_key_value(h)
            keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), position, axis=3)
            values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), position, axis=2)
            h = block(h, kv, True, self_kv=(keys, values), mask=visible)
            new_cache.append((keys, values))
        return self._logits(h)[:, 0], tuple(new_cache)
