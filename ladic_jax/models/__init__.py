"""Denoising networks shared by the model families."""

from ladic_jax.models.diffuser import Diffuser, DiffuserConfig

__all__ = ["Diffuser", "DiffuserConfig"]
