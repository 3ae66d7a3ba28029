"""The interface between a model family and the shared trainer, sampler loop and evaluator.

A family says three things: how text becomes the diffused representation and back, what the
denoiser is, and the loss; plus its denoising step. The trainer, sampler loop, evaluator,
checkpointing and sharding only ever talk to a family through this interface and know none by name.

All array methods are pure functions of (params, inputs, rng) so that they can be jitted and sharded
by the caller. ``batch`` is a dict of global arrays with at least ``image`` (B,H,W,3) float32 and, in
training, ``tokens``/``token_mask`` (B,L) int32. For infilling, a sampling batch may also carry
``template_tokens`` (B,L) int32 and ``template_given`` (B,L) int32 (1 where the template gives the token,
0 at a blank): a family that supports it keeps the given tokens and fills the blanks.
"""

from __future__ import annotations

import abc
from typing import Any, Iterator

import jax
import numpy as np

Params = Any
Batch = dict[str, jax.Array]


class Family(abc.ABC):
    """A model family. Constructed from the whole config; holds no parameters itself."""

    #: registry name, e.g. "ladic"
    name: str = ""

    def __init__(self, config):
        self.config = config
        self._tokenizer = None

    # ---- text space --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """HF tokenizer used by the input pipeline and for decoding: ``config.input.tokenizer``, loaded once."""
        if self._tokenizer is None:
            from ladic_jax.data import text as text_lib
            self._tokenizer = text_lib.load_tokenizer(self.config.input.tokenizer)
        return self._tokenizer

    def decode(self, token_ids: np.ndarray) -> list[str]:
        """Token ids (B, L) -> caption strings (host side)."""
        raise NotImplementedError

    # ---- parameters ------------------------------------------------------------------------
    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> Params:
        """Random initial parameters (traced under ``jax.eval_shape`` and ``jit(out_shardings=...)``)."""

    def load_pretrained(self, params: Params) -> tuple[Params, list[str]]:
        """Replaces parts of freshly initialised params with pretrained weights (host side).

        Returns the new params and a list of human-readable notes for the log.
        """
        return params, []

    def own_clip(self, params: Params) -> tuple[Any, Params, Any] | None:
        """(module, params, config) of a CLIP inside this family's model, if it has one (the evaluator can
        score captions with it: ``eval.clip = "self"``); None otherwise."""
        return None

    @property
    def clip_tokenizer(self):
        """The tokenizer of the CLIP of ``own_clip``: the family's own unless it says otherwise."""
        return self.tokenizer

    def prepare(self, params: Params, train_batches: Iterator[dict[str, np.ndarray]]) -> tuple[Params, list[str]]:
        """Data-dependent set-up before the first step (e.g. latent statistics). Host side."""
        return params, []

    # ---- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params: Params, batch: Batch, rng: jax.Array, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and a dict of scalar metrics."""

    # ---- sampling (the shared loop in ladic_jax.sampler drives these) ----------------------------
    @abc.abstractmethod
    def sampling_context(self, params: Params, batch: Batch, sampler_cfg) -> Any:
        """Everything constant across denoising steps (image tokens, cross-attention keys/values)."""

    @abc.abstractmethod
    def initial_state(self, params: Params, context: Any, rng: jax.Array, sampler_cfg) -> Any:
        """The pure-noise state at the first timestep."""

    @abc.abstractmethod
    def timesteps(self, sampler_cfg) -> np.ndarray:
        """Descending model timesteps of the trajectory; -1 marks the end."""

    @abc.abstractmethod
    def denoise_step(self, params: Params, context: Any, state: Any, t: jax.Array, t_next: jax.Array,
                     rng: jax.Array, sampler_cfg) -> Any:
        """One step from timestep t to t_next (t_next < 0: the last step)."""

    @abc.abstractmethod
    def finalize(self, params: Params, context: Any, state: Any, sampler_cfg) -> jax.Array:
        """Final state -> token ids (B, L) int32."""

    def prediction(self, params: Params, context: Any, state: Any, sampler_cfg) -> tuple[jax.Array, jax.Array]:
        """The clean prediction held by a state during sampling: token ids (B, L) and the latent (B, L, D)
        they decode from. Recorded per step for denoising trajectories."""
        raise NotImplementedError(f"family {self.name!r} does not record denoising trajectories")

    def back_and_refine(self, params: Params, context: Any, state: Any, fresh: Any, sampler_cfg) -> Any:
        """Back&Refine's restart: the state with the least confident positions replaced by those of
        ``fresh`` (a new initial state); the loop then denoises again from the first timestep."""
        raise NotImplementedError(f"family {self.name!r} does not support Back&Refine")


_REGISTRY: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    _REGISTRY[cls.name] = cls
    return cls


def get_family(config) -> Family:
    name = config.family
    # Importing the package registers the built-in families.
    import ladic_jax.families  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"config.family: unknown family {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](config)
