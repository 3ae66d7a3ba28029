"""Model families. Importing this package registers the built-in ones."""

from ladic_jax.families import clip_diffusionlm  # noqa: F401
from ladic_jax.families import coca  # noqa: F401
from ladic_jax.families import mc_diffusion  # noqa: F401
from ladic_jax.families import ladic  # noqa: F401
from ladic_jax.families import prefix_diffusion  # noqa: F401
from ladic_jax.families import vqvae  # noqa: F401
