"""The discrete denoiser of MC-Diffusion: a transformer over token classes that predicts x̂0 logits.

    h_0    = embed_norm(token_embedding[x_t] + position_embeddings[:L] + time(t))      x_t: K classes + [MASK]
    h      = blocks (self-attention over the L positions, cross-attention to the image tokens, MLP)
    logits = head(final_norm(h))                                                        (B, L, K)

The blocks, sizes and presets are the LaDiC diffuser's (``DiffuserBlock``, ``DiffuserConfig``; its
``latent_dim`` and input/output switches are unused), non-causal like it, so that the discrete family can
match the continuous ones in depth and width. The time embedding is the diffuser's ``mlp`` one.

The image condition is a sequence of discrete VQ codes (B, N) and a [MASK] code (index ``num_codes``) that
the Masked Condition Strategy puts in place of some of them (all of them: the null condition of
classifier-free guidance). Each code becomes a token of width ``cond_dim``:

    code_embedding = "learned":  a table (num_codes + 1, cond_dim)
                   = "codebook": Dense(codebook[code]) from the frozen VQ codebook (num_codes, D), so that
                     codes whose vectors are near start near; [MASK] a learned vector
    + code_positions (N, cond_dim), then ``code_encoder_depth`` pre-LN self-attention blocks over the N code
    tokens (0 in the paper, whose VQGAN encoder already has attention; a small convolutional VQ-VAE's codes
    see only their patch), then LayerNorm.

``condition`` computes every block's cross-attention keys/values once per image; ``denoise`` reuses them.
Parameters: ``token_embedding``, ``position_embeddings``, ``time_mlp_{in,out}``, ``embed_norm``,
``block_{i}/...``, ``final_norm`` (pre-LN), ``head``, ``code_table`` or ``code_proj`` + ``mask_code``,
``code_positions``, ``code_encoder_{i}`` (``encoders.pre_norm_block``), ``code_norm``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.encoders.pre_norm_block import PreNormBlock
from ladic_jax.models.diffuser import CrossKV, DiffuserBlock, DiffuserConfig, sinusoid_features

CODE_EMBEDDINGS = ("learned", "codebook")


class DiscreteDenoiser(nn.Module):
    config: DiffuserConfig
    num_classes: int         # K text classes; the input has K + 1 (the last is [MASK])
    num_codes: int           # image codebook size; code index num_codes is the masked image token
    num_image_tokens: int    # N
    code_embedding: str = "learned"
    code_encoder_depth: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype)
        self.token_embedding = nn.Embed(self.num_classes + 1, c.width, embedding_init=nn.initializers.normal(0.02),
                                        name="token_embedding", **kw)
        self.position_embeddings = self.param("position_embeddings", nn.initializers.normal(c.position_init_std),
                                              (c.max_len, c.width))
        self.time_mlp_in = nn.Dense(c.width, name="time_mlp_in", **kw)
        self.time_mlp_out = nn.Dense(c.width, name="time_mlp_out", **kw)
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, **kw)
        self.embed_norm = norm(name="embed_norm")
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = [DiffuserBlock(c, name=f"block_{i}", **kw) for i in range(c.depth)]
        if c.block_norm == "pre":
            self.final_norm = norm(name="final_norm")
        self.head = nn.Dense(self.num_classes, name="head", **kw)
        if self.code_embedding == "learned":
            self.code_table = nn.Embed(self.num_codes + 1, c.cond_dim, embedding_init=nn.initializers.normal(0.02),
                                       name="code_table", **kw)
        else:
            self.code_proj = nn.Dense(c.cond_dim, name="code_proj", **kw)
            self.mask_code = self.param("mask_code", nn.initializers.normal(0.02), (c.cond_dim,))
        self.code_positions = self.param("code_positions", nn.initializers.normal(0.02),
                                         (self.num_image_tokens, c.cond_dim))
        self.code_encoder = [PreNormBlock(c.num_heads, c.mlp_dim, "gelu", c.layer_norm_eps, dtype=self.dtype,
                                          name=f"code_encoder_{i}") for i in range(self.code_encoder_depth)]
        self.code_norm = norm(name="code_norm")

    def condition(self, codes: jax.Array, codebook: jax.Array | None = None) -> CrossKV:
        """Cross-attention keys/values of every block for image codes (B, N) int32 (``num_codes`` = masked);
        ``codebook`` (num_codes, D) for ``code_embedding="codebook"``."""
        if codes.ndim != 2 or codes.shape[1] != self.num_image_tokens:
            raise ValueError(f"codes must have shape (batch, {self.num_image_tokens}), got {codes.shape}")
        masked = codes >= self.num_codes
        if self.code_embedding == "learned":
            e = self.code_table(codes)
        else:
            if codebook is None:
                raise ValueError("code_embedding='codebook' needs the VQ codebook")
            vectors = jnp.take(codebook, jnp.minimum(codes, self.num_codes - 1), axis=0)
            e = jnp.where(masked[..., None], self.mask_code.astype(self.dtype),
                          self.code_proj(jax.lax.stop_gradient(vectors).astype(self.dtype)))
        e = e + self.code_positions.astype(self.dtype)
        for block in self.code_encoder:
            e = block(e)
        e = self.code_norm(e)
        return tuple(block.cross_key_value(e) for block in self.blocks)

    def denoise(self, x_t: jax.Array, t: jax.Array, cond: CrossKV, deterministic: bool = True) -> jax.Array:
        """x̂0 logits (B, L, K) float32 from classes x_t (B, L) int32 (K = [MASK]) and timesteps t (B,)."""
        c = self.config
        batch, length = x_t.shape
        if length > c.max_len:
            raise ValueError(f"x_t has length {length}, more than the denoiser's max_len {c.max_len}")
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        time = self.time_mlp_out(nn.silu(self.time_mlp_in(sinusoid_features(t, c.time_freq_dim).astype(self.dtype))))
        h = self.token_embedding(x_t) + self.position_embeddings[:length].astype(self.dtype) + time[:, None, :]
        h = self.embed_dropout(self.embed_norm(h), deterministic=deterministic)
        for block, kv in zip(self.blocks, cond):
            h = block(h, kv, deterministic)
        if c.block_norm == "pre":
            h = self.final_norm(h)
        return self.head(h).astype(jnp.float32)

    def __call__(self, x_t, t, codes, codebook=None, deterministic=True):
        return self.denoise(x_t, t, self.condition(codes, codebook), deterministic)
