"""The pre-LayerNorm transformer block of CLIP (both towers) and BLIP's vision tower.

    x = x + attention(LN1(x)); x = x + fc2(act(fc1(LN2(x))))

Parameter names (`layer_norm1`, `attention/{query,key,value,out}`, `layer_norm2`, `mlp/fc1`, `mlp/fc2`) follow the
HF module names so that the checkpoint table stays a line-by-line correspondence.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ladic_jax.encoders.activations import get_activation
from ladic_jax.encoders.attention import KERNEL_INIT, MultiHeadAttention


class Mlp(nn.Module):
    """fc1 -> activation -> fc2."""

    hidden_size: int
    intermediate_size: int
    activation: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT)
        x = nn.Dense(self.intermediate_size, name="fc1", **kwargs)(x)
        return nn.Dense(self.hidden_size, name="fc2", **kwargs)(get_activation(self.activation)(x))


class PreNormBlock(nn.Module):
    """One pre-LayerNorm transformer block; `mask` is a boolean attention mask or None."""

    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name="attention")(norm("layer_norm1")(x), mask)
        mlp = Mlp(x.shape[-1], self.intermediate_size, self.activation, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="mlp")
        return x + mlp(norm("layer_norm2")(x))
