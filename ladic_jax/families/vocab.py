"""A closed vocabulary: an output head that scores only the token ids the training captions use.

On small synthetic data (the shapes captions use ~45 words of a 30k WordPiece vocabulary) scoring every
id costs most of a step; a family with ``model.vocab = "train"`` scores only ``model.max_vocab`` ids
instead. The ids live in the family's parameters as a (K,) float32 array (``vocab_ids``: exact for ids
below 2^24, stored in the checkpoint with the rest, never trained), filled by the family's ``prepare``
from one epoch of training captions. The functions here are shared by every family that offers it.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

CHOICES = ("full", "train")


def validate(config) -> None:
    """``model.vocab`` and, for a closed vocabulary, ``model.max_vocab``, named on error."""
    from ladic_jax import config as config_lib
    config_lib.require_choice(config, "model.vocab", CHOICES)
    if config.model.vocab == "train":
        config_lib.require_positive(config, "model.max_vocab", integer=True)


def size(config) -> int:
    """K, the number of ids scored (0: the full vocabulary)."""
    return int(config.model.max_vocab) if config.model.vocab == "train" else 0


def epoch_batches(config) -> int:
    """Training batches in one epoch (what ``prepare`` scans for the ids in use)."""
    from ladic_jax.data import pipeline
    n = pipeline.num_eval_examples(config.input, config.input.train_split)
    return -(-n // int(config.input.batch_size))


def build(seen: Iterable[int], always: Iterable[int], size_: int) -> tuple[np.ndarray, str]:
    """The (K,) float32 ``vocab_ids`` of the ids ``seen`` in the captions plus ``always`` (special tokens),
    sorted, padded with the first of ``always``; raises if they do not fit in K."""
    always = list(always)
    ids = sorted(set(seen) | set(always))
    if len(ids) > size_:
        raise ValueError(f"config.model.max_vocab={size_} is too small: the training captions use {len(ids)} "
                         "distinct token ids (special tokens included)")
    padded = np.full(size_, always[0], np.float32)
    padded[: len(ids)] = ids
    return padded, f"closed vocabulary of {len(ids)} token ids from one epoch of training captions"


def to_index(vocab_ids: jnp.ndarray, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Token ids -> positions in the closed vocabulary (first match), and whether each was found."""
    match = tokens[..., None] == vocab_ids
    return jnp.argmax(match, -1), jnp.any(match, -1)


def to_token_ids(vocab_ids: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """Positions in the closed vocabulary -> token ids."""
    return vocab_ids[index]


def mask_padding(logits: jnp.ndarray, vocab_ids: jnp.ndarray) -> jnp.ndarray:
    """Logits over the closed vocabulary with its padding entries (repeats of an id already in it) at a
    large negative value: otherwise an id repeated r times would split its probability r ways."""
    first, _ = to_index(vocab_ids, vocab_ids)
    real = first == jnp.arange(vocab_ids.shape[0])
    return jnp.where(real, logits, jnp.asarray(-1e9, logits.dtype))
