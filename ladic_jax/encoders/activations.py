"""Activation functions by their Hugging Face config names.

HF configs name the MLP non-linearity by a string (`hidden_act` for BERT and CLIP, `activation` for DistilBERT).
The encoders here resolve that string once, through this table, so that a checkpoint's activation is reproduced
exactly: "gelu" in HF is the exact erf form, not the tanh approximation that `jax.nn.gelu` uses by default.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: jax.Array) -> jax.Array:
    # CLIP's approximation: x * sigmoid(1.702 x).
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function HF calls `name`; raises on names this package does not implement."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}"
        ) from None
