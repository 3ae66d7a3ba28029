"""Continuous Gaussian diffusion: noise schedules, forward noising, and reverse steps from an x0-prediction.

Family-agnostic: nothing here knows what the diffused vectors are (BERT latents, word embeddings, ...).

Timestep convention
-------------------
Discrete timesteps are integers ``t = 0 .. T-1``. ``alphas_cumprod(...)[t]`` is ᾱ_t, the fraction of signal
variance left after ``t + 1`` forward steps: ``t = 0`` is the least noisy step and ``t = T-1`` the noisiest.
The clean data x0 itself has no index (it is "t = -1"); a reverse step whose target ``t_prev`` is negative
therefore means "finish": it returns the x0-prediction. The one exception is the ``official`` schedule of the
LaDiC release, whose first beta is 0, so that its ᾱ_0 = 1 and ``t = 0`` is noise-free.

Noise factor
------------
Following Difformer (Gao et al. 2022), which LaDiC adopts, the forward process may scale the noise:
``x_t = sqrt(ᾱ_t) x0 + k sqrt(1 - ᾱ_t) ε``. Training uses ``noise_factor`` (LaDiC release: 4), sampling uses
``sample_noise_factor`` (1 in the release). All reverse steps are written for a process with a factor k, so
that ``k = 1`` gives the textbook formulas; the matching prior is x_T ~ N(0, k² I) (N(0, I) for k = 1).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "sqrt", "trunc_lin", "trunc_cos", "official")

_MAX_BETA = 0.999


def _betas_from_alpha_bar(
    alpha_bar: Callable[[np.ndarray], np.ndarray], num_timesteps: int, include_start: bool
) -> np.ndarray:
    """Discretises a continuous ᾱ(u), u in [0, 1], into T betas clipped at 0.999 (Diffusion-LM's two variants).

    With ``include_start=False`` (improved-DDPM / Diffusion-LM ``sqrt``): β_i = 1 - ᾱ((i+1)/T) / ᾱ(i/T), so
    the product starts from ᾱ(0) normalised away. With ``include_start=True`` (Prefix-diffusion ``trunc_cos``):
    β_0 = 1 - ᾱ(0) and β_i = 1 - ᾱ(i/T) / ᾱ((i-1)/T) for i >= 1, so that ᾱ_i = ᾱ(i/T) itself: the
    schedule is "truncated", its first step already carrying noise 1 - ᾱ(0).
    """
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a = alpha_bar(u)
    if include_start:
        ratios = np.concatenate([[a[0]], a[1:num_timesteps] / a[: num_timesteps - 1]])
    else:
        ratios = a[1:] / a[:-1]
    return np.minimum(1.0 - ratios, _MAX_BETA)


def _betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """The T betas of a named schedule (float64); see `alphas_cumprod`."""
    T = num_timesteps
    scale = 1000.0 / T
    if schedule == "linear":
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64), _MAX_BETA)
    if schedule == "cosine":
        s = 0.008
        return _betas_from_alpha_bar(
            lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2, T, include_start=False
        )
    if schedule == "sqrt":
        return _betas_from_alpha_bar(lambda u: 1.0 - np.sqrt(u + 1e-4), T, include_start=False)
    if schedule == "trunc_lin":
        return np.minimum(np.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, T, dtype=np.float64), _MAX_BETA)
    if schedule == "trunc_cos":
        return _betas_from_alpha_bar(
            lambda u: np.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2, T, include_start=True
        )
    if schedule == "official":
        linear = np.minimum(np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64), _MAX_BETA)
        return np.concatenate([[0.0], linear])[:T]
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def alphas_cumprod(schedule: str, num_timesteps: int) -> np.ndarray:
    """ᾱ_t for t = 0 .. T-1 (float64, shape (T,)); t = 0 is the least noisy step (see the module docstring).

    Schedules (u = t / T where a continuous ᾱ(u) is given):
      - ``linear``: DDPM betas linspace(1e-4, 0.02, T) scaled by 1000 / T (improved-DDPM's rule, so that any T
        spans the same noise range); ᾱ = cumprod(1 - β).
      - ``cosine``: Nichol & Dhariwal, ᾱ(u) ∝ cos²((u + 0.008) / 1.008 · π/2), betas clipped at 0.999; the
        paper's choice for LaDiC.
      - ``sqrt``: Diffusion-LM, ᾱ(u) = 1 - sqrt(u + 1e-4), discretised like ``cosine``.
      - ``trunc_lin``: Prefix-diffusion, β = linspace(s·1e-4 + 0.01, s·0.02 + 0.01, T), s = 1000 / T.
      - ``trunc_cos``: Prefix-diffusion, ᾱ(u) = cos²((u + 0.1) / 1.1 · π/2), with β_0 = 1 - ᾱ(0) so that
        ᾱ_t = ᾱ(t / T) (first step already noisy), later betas clipped at 0.999.
      - ``official``: the LaDiC release, betas = [0, linspace(1e-4, 0.02, T) · 1000 / T] and
        ᾱ = cumprod(1 - betas)[:T], so ᾱ_0 = 1 exactly (identical to the release at T = 1000).

    The linear-beta schedules scale their betas by 1000 / T; for small T (linear: T < 50, trunc_lin: T < 21)
    that would exceed 1, so every beta is clipped at 0.999 like the ᾱ(u)-derived ones.

    Raises:
      ValueError: unknown schedule name, or num_timesteps < 1.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    betas = _betas(schedule, int(num_timesteps))
    return np.cumprod(1.0 - betas)


def _expand_to(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example coefficient (B,) or scalar so that it broadcasts over x's trailing dims."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


@flax.struct.dataclass
class GaussianDiffusion:
    """A Gaussian diffusion process with an x0-predicting model; a pytree (ᾱ is a leaf, factors are static).

    Build it with `GaussianDiffusion.create`. All methods take integer timesteps ``t`` of shape (B,) (or a
    scalar), possibly traced, and broadcast them over the trailing dimensions of the data, so they can be used
    inside ``jit``, ``vmap`` and ``lax.scan``.

    Attributes:
      alphas_cumprod: ᾱ_t, float32 (T,).
      one_minus_alphas_cumprod: 1 - ᾱ_t, float32 (T,), computed in float64: for small t, 1 - ᾱ_t taken from
        a float32 ᾱ_t would lose most of its digits.
      noise_factor: k used by `q_sample` when no factor is given (training; LaDiC release 4.0).
      sample_noise_factor: k used by the reverse steps when no factor is given (sampling; release 1.0).
    """

    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array
    noise_factor: float = flax.struct.field(pytree_node=False, default=1.0)
    sample_noise_factor: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(
        cls,
        schedule: str = "cosine",
        num_timesteps: int = 1000,
        noise_factor: float = 1.0,
        sample_noise_factor: float = 1.0,
    ) -> "GaussianDiffusion":
        """Builds the process for a named schedule (see `alphas_cumprod`)."""
        for name, value in (("noise_factor", noise_factor), ("sample_noise_factor", sample_noise_factor)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        abar = alphas_cumprod(schedule, num_timesteps)
        return cls(
            alphas_cumprod=jnp.asarray(abar, dtype=jnp.float32),
            one_minus_alphas_cumprod=jnp.asarray(1.0 - abar, dtype=jnp.float32),
            noise_factor=float(noise_factor),
            sample_noise_factor=float(sample_noise_factor),
        )

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _abar(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(ᾱ_t, 1 - ᾱ_t) for integer t >= 0 (float32), and (1, 0) (clean data) for t < 0."""
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        index = jnp.maximum(t, 0)
        abar = jnp.where(t >= 0, self.alphas_cumprod[index], 1.0)
        one_minus = jnp.where(t >= 0, self.one_minus_alphas_cumprod[index], 0.0)
        return abar, one_minus

    @staticmethod
    def _check_t(t: jax.Array, x: jax.Array, name: str) -> jax.Array:
        t = jnp.asarray(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(
                f"{name} must be a scalar or have shape (batch,) = ({x.shape[0]},), got shape {t.shape}"
            )
        return t

    def q_sample(
        self, x0: jax.Array, t: jax.Array, noise: jax.Array, factor: float | None = None
    ) -> jax.Array:
        """x_t = sqrt(ᾱ_t) x0 + k sqrt(1 - ᾱ_t) ε with k = `factor` (default `noise_factor`).

        Args:
          x0: clean data (B, ...).
          t: int timesteps (B,) or scalar; t < 0 returns x0 unchanged.
          noise: ε, same shape as x0.
          factor: the noise factor k; None means `self.noise_factor` (the training factor).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {noise.shape} must equal x0 shape {x0.shape}")
        t = self._check_t(t, x0, "t")
        k = self.noise_factor if factor is None else factor
        abar, one_minus = (_expand_to(c, x0) for c in self._abar(t))
        out = jnp.sqrt(abar) * x0 + k * jnp.sqrt(one_minus) * noise
        return out.astype(x0.dtype)

    def input_scale(self, t: jax.Array, factor: float | None = None) -> jax.Array:
        """1 / sqrt(ᾱ_t + k² (1 - ᾱ_t)): the factor that gives x_t unit variance when x0 and ε do.

        With noise factor k = 4, x_t's scale grows from 1 to 4 with t; fed to the model as is, it drowns the
        position and time embeddings added to the model's input at high t. Scaled, the model's input has
        the same magnitude at every t and for training (k = `noise_factor`) and sampling (k =
        `sample_noise_factor`) alike. k = `factor` (default `noise_factor`); t < 0 gives 1.
        """
        k = self.noise_factor if factor is None else factor
        abar, one_minus = self._abar(jnp.asarray(t))
        return jax.lax.rsqrt(abar + k * k * one_minus)

    def snr(self, t: jax.Array) -> jax.Array:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (for k = 1; divide by k² otherwise); inf where ᾱ_t = 1."""
        abar, one_minus = self._abar(jnp.asarray(t))
        return abar / one_minus

    def sampling_timesteps(self, num_steps: int) -> np.ndarray:
        """The model's timesteps for a sampler of `num_steps` steps: descending ints, stride T // num_steps.

        Values are ``T-1 - i·(T // num_steps)`` for i = 0 .. num_steps-1: the first is always T-1, the stride is
        constant, and the last is ``T // num_steps - 1 + T % num_steps`` (0 when num_steps divides T, e.g. all
        1000 steps end at 0; 5 of 1000 give 999, 799, 599, 399, 199). Step i goes from ``ts[i]`` to
        ``ts[i+1]``, and the last step goes to -1 (clean data), which the reverse steps treat as "return x̂0".
        This is the LaDiC release's spacing (t = 999, 999 - s, ..., s = 1000 / steps).
        """
        T = self.num_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer in 1..{T}, got {num_steps!r}")
        stride = T // int(num_steps)
        return (T - 1 - stride * np.arange(int(num_steps))).astype(np.int32)

    def ddim_step(
        self,
        x_t: jax.Array,
        x0_hat: jax.Array,
        t: jax.Array,
        t_prev: jax.Array,
        eta: float | jax.Array,
        key: jax.Array,
        factor: float | None = None,
    ) -> jax.Array:
        """One DDIM update x_t -> x_{t_prev} from an x0-prediction (Song et al. 2020, eq. 12).

        ε̂ = (x_t - sqrt(ᾱ_t) x̂0) / (k sqrt(1 - ᾱ_t));
        σ = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev);
        x_prev = sqrt(ᾱ_prev) x̂0 + k (sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z), z ~ N(0, I).
        η = 0 is deterministic DDIM; η = 1 with t_prev = t - 1 is the DDPM posterior q(x_{t-1} | x_t, x̂0).
        Where t_prev < 0 the result is x̂0 (the final step). k = `factor` (default `sample_noise_factor`).
        """
        if x0_hat.shape != x_t.shape:
            raise ValueError(f"x0_hat shape {x0_hat.shape} must equal x_t shape {x_t.shape}")
        t = self._check_t(t, x_t, "t")
        t_prev = self._check_t(t_prev, x_t, "t_prev")
        k = self.sample_noise_factor if factor is None else factor
        dtype = x_t.dtype
        x_t = x_t.astype(jnp.float32)
        x0_hat = x0_hat.astype(jnp.float32)
        t, t_prev = jnp.broadcast_arrays(t, t_prev)
        abar_t, one_minus_t = (_expand_to(c, x_t) for c in self._abar(t))
        abar_prev, one_minus_prev = (_expand_to(c, x_t) for c in self._abar(t_prev))
        one_minus_t = jnp.maximum(one_minus_t, 1e-12)  # only t with ᾱ_t = 1 (official t = 0) hits this
        eps_hat = (x_t - jnp.sqrt(abar_t) * x0_hat) / (k * jnp.sqrt(one_minus_t))
        # 1 - ᾱ_t / ᾱ_prev written as a difference of the precise (1 - ᾱ) terms.
        var = (eta**2) * one_minus_prev / one_minus_t * (one_minus_t - one_minus_prev) / abar_prev
        var = jnp.clip(var, 0.0, one_minus_prev)
        z = jax.random.normal(key, x_t.shape, jnp.float32)
        x_prev = jnp.sqrt(abar_prev) * x0_hat + k * (
            jnp.sqrt(jnp.maximum(one_minus_prev - var, 0.0)) * eps_hat + jnp.sqrt(var) * z
        )
        final = _expand_to(t_prev < 0, x_t)
        return jnp.where(final, x0_hat, x_prev).astype(dtype)

    def renoise_step(
        self, x0_hat: jax.Array, t_prev: jax.Array, key: jax.Array, factor: float | None = None
    ) -> jax.Array:
        """The LaDiC release's sampler step: x_{t_prev} = q_sample(x̂0, t_prev) with fresh noise.

        k = `factor` (default `sample_noise_factor`); where t_prev < 0 the result is x̂0.
        """
        k = self.sample_noise_factor if factor is None else factor
        noise = jax.random.normal(key, x0_hat.shape, jnp.float32).astype(x0_hat.dtype)
        return self.q_sample(x0_hat, t_prev, noise, factor=k)
