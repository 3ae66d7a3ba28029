"""Multi-head self-attention shared by the BERT, ViT and CLIP text encoders, and its masks.

One implementation serves every encoder so that the numerics (scaling, masking, softmax precision) are the same
everywhere. Parameters are four 2-D `Dense` layers named `query`, `key`, `value`, `out`, so that a PyTorch
`nn.Linear` weight converts by a plain transpose (and a fused `qkv` weight by slicing rows first).

Masks are boolean arrays, True = may attend, broadcastable to (batch, heads, queries, keys). The scores are
accumulated and softmaxed in float32 whatever the activation dtype, and masked scores are replaced (not offset)
by the float32 minimum, so a bf16 model neither overflows nor lets padded keys leak through.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# HF initialises every linear layer of these encoders with N(0, 0.02); keeping it makes from-scratch runs comparable.
KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(batch, keys) array of 1 = token / 0 = padding -> boolean mask of shape (batch, 1, 1, keys)."""
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must have shape (batch, length), got shape {attention_mask.shape}"
        )
    return (attention_mask != 0)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """Boolean (1, 1, length, length) mask letting query i attend to keys 0..i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


class MultiHeadAttention(nn.Module):
    """Self-attention with `num_heads` heads over inputs of width `hidden_size` (= heads x head width)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0  # on the attention weights, when not deterministic (BERT's attention_probs_dropout)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        batch, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            dense = nn.Dense(
                width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT, name=name
            )
            return dense(x).reshape(batch, length, self.num_heads, head_dim)

        query, key, value = project("query"), project("key"), project("value")
        # Keys as (B, heads, head_dim, K) and values as (B, heads, K, head_dim): the layouts the two products read
        # (on the CPU, a ViT-B layer's attention at 197 tokens took half the time so).
        key, value = jnp.transpose(key, (0, 2, 3, 1)), jnp.transpose(value, (0, 2, 1, 3))
        scores = jnp.einsum("bqhd,bhdk->bhqk", query, key, preferred_element_type=jnp.float32)
        scores = scores * (head_dim**-0.5)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        if self.dropout_rate and not deterministic:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        context = jnp.einsum("bhqk,bhkd->bqhd", weights, value).reshape(batch, length, width)
        out = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT, name="out")
        return out(context)
