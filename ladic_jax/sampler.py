"""The one sampler loop for every family: a jitted ``lax.scan`` over the family's denoising steps.

The family computes everything that is constant across steps once (``sampling_context``: image
tokens, cross-attention keys and values), then the loop carries only the per-step state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax.families.base import Family


def sample(family: Family, params: Any, batch: dict[str, jax.Array], rng: jax.Array, sampler_cfg
           ) -> jax.Array:
    """Token ids (B, L) for the images in ``batch``. Trace under jit; sampler_cfg must be static."""
    ts = np.asarray(family.timesteps(sampler_cfg), dtype=np.int32)
    t_next = np.concatenate([ts[1:], np.array([-1], np.int32)])
    context = family.sampling_context(params, batch, sampler_cfg)
    init_rng, loop_rng = jax.random.split(rng)
    state = family.initial_state(params, context, init_rng, sampler_cfg)

    def body(state, xs):
        t, tn, key = xs
        return family.denoise_step(params, context, state, t, tn, key, sampler_cfg), None

    keys = jax.random.split(loop_rng, len(ts))
    state, _ = jax.lax.scan(body, state, (jnp.asarray(ts), jnp.asarray(t_next), keys))
    return family.finalize(params, context, state, sampler_cfg)


def make_sample_fn(family: Family, sampler_cfg, **jit_kwargs) -> Callable:
    """jit-compiled ``fn(params, batch, rng) -> token ids``; one compilation per sampler config."""
    def fn(params, batch, rng):
        return sample(family, params, batch, rng, sampler_cfg)
    return jax.jit(fn, **jit_kwargs)


class SampleFns:
    """The jit-compiled sample functions of one family, one per distinct sampler config, built once."""

    def __init__(self, family: Family, **jit_kwargs):
        self.family = family
        self.jit_kwargs = jit_kwargs
        self._fns: dict[tuple, Callable] = {}

    def __call__(self, sampler_cfg) -> Callable:
        key = tuple(sorted(sampler_cfg.to_dict().items()))
        if key not in self._fns:
            self._fns[key] = make_sample_fn(self.family, sampler_cfg, **self.jit_kwargs)
        return self._fns[key]
