"""ladic_jax: diffusion-based image captioning in JAX/Flax."""

__version__ = "0.1.0"
