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
import functools
from typing import Any, Iterator

import jax
import numpy as np

Params = Any
Batch = dict[str, jax.Array]

#: Key of ``Family.loss``'s metrics under which a family hands the trainer new values for parameters that
#: are not trained by gradient (EMA codebooks, loss histories for importance sampling): a dict
#: {parameter path (``sharding.path_str``): new array}. Those parameters must be frozen
#: (``config.optim.frozen``); the trainer writes the values in after the optimizer's update.
STATE_UPDATES = "_state_updates"


class Family(abc.ABC):
    """A model family. Constructed from the whole config; holds no parameters itself."""

    #: registry name, e.g. "ladic"
    name: str = ""
    #: what the evaluator does with the family: "captions" (sample through the sampler loop, decode,
    #: score) or "reconstruction" (an image autoencoder: ``reconstruct``, scored by pixel error and
    #: codebook use, with a sheet of originals and reconstructions)
    evaluation: str = "captions"
    #: a frozen image encoder whose output the trainer may cache per training image (``ladic_jax.feature_cache``):
    #: the batch field the loss then reads in place of "image", and a regex of the encoder's parameters (all
    #: of which must be frozen); None: no such encoder
    feature_field: str | None = None
    feature_params: str | None = None

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

    @functools.cached_property
    def start_end_pad(self) -> tuple[int, int, int]:
        """The tokenizer's start and end tokens (those it puts around every caption: [CLS]/[SEP] for BERT,
        <|startoftext|>/<|endoftext|> for CLIP) and its padding token."""
        ids = self.tokenizer("")["input_ids"]
        if len(ids) != 2:
            raise ValueError(f"tokenizer {self.config.input.tokenizer!r} does not wrap a caption in a start and "
                             f"an end token (an empty caption gives {ids}); family {self.name!r} needs both")
        pad = self.tokenizer.pad_token_id
        return int(ids[0]), int(ids[1]), int(ids[1] if pad is None else pad)

    def decode_to_end(self, token_ids: np.ndarray) -> list[str]:
        """Captions of token ids (B, L) that start with the start token and end at the first end token after
        it (whatever follows is dropped): for families that generate every position."""
        from ladic_jax.data import text as text_lib
        _, end, pad = self.start_end_pad
        ids = np.array(token_ids, copy=True)
        after = np.cumsum(ids[:, 1:] == end, axis=1) > 0  # the end token and whatever follows it
        ids[:, 1:][after] = pad
        return text_lib.decode_tokens(self.tokenizer, ids)

    # ---- parameters ------------------------------------------------------------------------
    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> Params:
        """Random initial parameters (traced under ``jax.eval_shape`` and ``jit(out_shardings=...)``)."""

    def load_pretrained(self, abstract_params: Params) -> tuple[dict[str, np.ndarray], list[str]]:
        """Pretrained weights for parts of the freshly initialised params (host side), given their shapes.

        Returns {parameter path: array} (the trainer places them on the params' shardings) and a list of
        human-readable notes for the log.
        """
        return {}, []

    def own_clip(self, params: Params) -> tuple[Any, Params, Any] | None:
        """(module, params, config) of a CLIP inside this family's model, if it has one (the evaluator can
        score captions with it: ``eval.clip = "self"``); None otherwise."""
        return None

    @property
    def clip_tokenizer(self):
        """The tokenizer of the CLIP of ``own_clip``: the family's own unless it says otherwise."""
        return self.tokenizer

    def prepare(self, params: Params, train_batches: Iterator[dict[str, np.ndarray]]
                ) -> tuple[dict[str, np.ndarray], list[str]]:
        """Data-dependent set-up before the first step (e.g. latent statistics): {parameter path: array} and
        notes, as ``load_pretrained``. Host side."""
        return {}, []

    def frozen_features(self, params: Params, images: jax.Array) -> jax.Array:
        """What the loss reads as ``batch[feature_field]``: the frozen encoder's output for images (B, ...)."""
        raise NotImplementedError(f"family {self.name!r} has no cacheable encoder")

    # ---- training ----------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params: Params, batch: Batch, rng: jax.Array, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and a dict of scalar metrics."""

    def reconstruct(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """For ``evaluation = "reconstruction"``: ``image`` (B, H, W, 3), the input's reconstruction in the
        input's normalisation, and ``codes`` (B, N) int32, the discrete codes it went through."""
        raise NotImplementedError(f"family {self.name!r} does not reconstruct images")

    # ---- sampling (the shared loop in ladic_jax.sampler drives these) ----------------------------
    def sampling_context(self, params: Params, batch: Batch, sampler_cfg) -> Any:
        """Everything constant across denoising steps (image tokens, cross-attention keys/values)."""
        raise NotImplementedError(_no_captions(self))

    def initial_state(self, params: Params, context: Any, rng: jax.Array, sampler_cfg) -> Any:
        """The pure-noise state at the first timestep."""
        raise NotImplementedError(_no_captions(self))

    def timesteps(self, sampler_cfg) -> np.ndarray:
        """Descending model timesteps of the trajectory; -1 marks the end."""
        raise NotImplementedError(_no_captions(self))

    def denoise_step(self, params: Params, context: Any, state: Any, t: jax.Array, t_next: jax.Array,
                     rng: jax.Array, sampler_cfg) -> Any:
        """One step from timestep t to t_next (t_next < 0: the last step)."""
        raise NotImplementedError(_no_captions(self))

    def finalize(self, params: Params, context: Any, state: Any, sampler_cfg) -> jax.Array:
        """Final state -> token ids (B, L) int32."""
        raise NotImplementedError(_no_captions(self))

    def prediction(self, params: Params, context: Any, state: Any, sampler_cfg) -> tuple[jax.Array, jax.Array]:
        """The clean prediction held by a state during sampling: token ids (B, L) and the latent (B, L, D)
        they decode from. Recorded per step for denoising trajectories."""
        raise NotImplementedError(f"family {self.name!r} does not record denoising trajectories")

    def back_and_refine(self, params: Params, context: Any, state: Any, fresh: Any, sampler_cfg) -> Any:
        """Back&Refine's restart: the state with the least confident positions replaced by those of
        ``fresh`` (a new initial state); the loop then denoises again from the first timestep."""
        raise NotImplementedError(f"family {self.name!r} does not support Back&Refine")


def _no_captions(family: Family) -> str:
    return f"family {family.name!r} does not caption (its evaluation is {family.evaluation!r})"


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
