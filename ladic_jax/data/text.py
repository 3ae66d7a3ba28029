"""Caption text: normalisation and tokenization around a Hugging Face fast tokenizer.

Every caption that enters training or evaluation goes through `normalize_caption` first, so the
model, the references and the metrics all see one spelling of the text:

* bytes are read as UTF-8, an invalid sequence as U+FFFD (so it ends up a space);
* Unicode NFKC, then lower-case;
* curly quotes and backticks become a plain apostrophe; an apostrophe is kept only between two
  letters or digits (possessives and contractions: "man's", "don't"), every other one is dropped;
* every other punctuation or symbol character (anything that is not a letter, digit, apostrophe
  or whitespace; also "_") becomes a space, so "t-shirt" -> "t shirt" and "dog." -> "dog";
* runs of whitespace collapse to one space; leading and trailing space is removed.

Tokenization runs on the host, in numpy, on whole batches (the fast tokenizers are written in
Rust and batch well); it pads to a fixed length and truncates, keeping [CLS] ... [SEP].
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from ladic_jax.pretrained_paths import resolve_alias

__all__ = [
    "normalize_caption",
    "swap_left_right",
    "TokenizerError",
    "load_tokenizer",
    "tokenize",
    "tokenize_template",
    "decode_tokens",
]

BLANK = "[MASK]"
_BLANK_RE = re.compile(r"\[mask\]", re.IGNORECASE)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u02bc": "'"})
# An apostrophe that does not sit between two letters/digits ("[^\W_]" is a letter or digit).
_LOOSE_APOSTROPHE = re.compile(r"(?<![^\W_])'|'(?![^\W_])")
# Anything that is not a word character, whitespace or apostrophe; and the underscore.
_PUNCTUATION = re.compile(r"[^\w\s']|_")
_WHITESPACE = re.compile(r"\s+")
# What a BERT WordPiece decode leaves around a kept apostrophe: "man ' s" -> "man's".
_SPACED_APOSTROPHE = re.compile(r"(?<=[^\W_])\s*'\s*(?=[^\W_])")

_LEFT_RIGHT = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_LEFT_RIGHT_WORD = re.compile(r"\b(" + "|".join(_LEFT_RIGHT) + r")\b")


def normalize_caption(text: str | bytes) -> str:
    """Returns the canonical form of a caption (see the module docstring for the rules)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")  # U+FFFD is a symbol: it becomes a space.
    if not isinstance(text, str):
        raise TypeError(f"caption must be str or bytes, got {type(text).__name__}: {text!r}")
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    text = _PUNCTUATION.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip()


def swap_left_right(text: str) -> str:
    """Swaps the words left<->right (and leftmost<->rightmost) in a normalised caption.

    Used when a training image is flipped horizontally, so that the caption stays true of the
    picture. Only whole, lower-case words are swapped ("right" as in "right now" is swapped too;
    that error is rare and harmless next to a caption that contradicts its image).
    """
    return _LEFT_RIGHT_WORD.sub(lambda m: _LEFT_RIGHT[m.group(1)], text)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded; the one-line message names it, the config field that gives it
    and how to give another."""


# What Hugging Face accepts as a hub id ("name" or "namespace/name"); anything else can only be a path.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (Hugging Face's go on with generic advice), at most ``limit``
    characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."


def load_tokenizer(name_or_path: str, field: str = "config.input.tokenizer"):
    """Loads a Hugging Face *fast* tokenizer from a local directory or a hub id.

    A hub id resolves through the normal Hugging Face cache, so it works offline only when the
    files are cached. Slow (pure Python) tokenizers are rejected: the input pipeline tokenizes
    whole batches on the host and relies on the Rust implementation for speed.

    Raises ``TokenizerError`` (a ValueError) with a one-line message naming the tokenizer, the config
    ``field`` it came from and how to give one that loads.
    """
    import transformers  # Imported here: only the host input path needs it.

    if not isinstance(name_or_path, str) or not name_or_path:
        raise TokenizerError(f"{field} must be a local directory or a hub id, got {name_or_path!r}")
    try:
        name_or_path = resolve_alias(name_or_path)
    except FileNotFoundError as e:  # "minilm" without its package
        raise TokenizerError(f"tokenizer {name_or_path!r} ({field}): {e}") from e
    example = f"--{field}=/path/to/{os.path.basename(name_or_path.rstrip('/')) or 'tokenizer'}"
    local = os.path.isdir(name_or_path)
    if not local and not _HUB_ID.fullmatch(name_or_path):
        raise TokenizerError(f"tokenizer {name_or_path!r} ({field}) not found: no such directory (and not a "
                             f"Hugging Face hub id); give a tokenizer directory: {example}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except (OSError, ValueError) as e:
        if local:
            files = set(os.listdir(name_or_path))
            cause = (_first_line(e) if files & {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} else
                     "it holds no tokenizer files (tokenizer.json, or vocab.txt and tokenizer_config.json)")
            raise TokenizerError(f"could not load tokenizer {name_or_path!r} ({field}) from the local directory: "
                                 f"{cause}") from e
        raise TokenizerError(
            f"could not load tokenizer {name_or_path!r} ({field}): it is not a local directory, and as a Hugging "
            f"Face hub id it is not in the local cache or could not be fetched ({_first_line(e)}); give its "
            f"directory: {example}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"tokenizer {name_or_path!r} ({field}) is not a fast tokenizer "
                             f"({type(tokenizer).__name__})")
    return tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch of (already normalised) texts to fixed-length id and mask arrays.

    Adds the tokenizer's special tokens ([CLS] ... [SEP] for BERT), truncates to `max_length`
    (the [SEP] is kept) and pads with the pad id.

    Returns:
      `(tokens, mask)`, both int32 of shape `(len(texts), max_length)`; `mask` is the attention
      mask, 1 on real tokens including [CLS]/[SEP] and 0 on padding.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to hold [CLS] and [SEP], got {max_length}")
    texts = list(texts)
    if not texts:
        empty = np.zeros((0, max_length), np.int32)
        return empty, empty.copy()
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def decode_tokens(tokenizer, tokens: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    """Decodes a batch of token ids to normalised captions (special tokens dropped).

    The WordPiece decoder writes a kept apostrophe as a separate word ("man ' s"); it is joined
    back, so that `decode_tokens(tokenize(normalize_caption(c)))` gives back the normalised caption
    whenever every word of it is in the vocabulary.
    """
    texts = tokenizer.batch_decode(
        np.asarray(tokens).tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return [_WHITESPACE.sub(" ", _SPACED_APOSTROPHE.sub("'", t)).strip() for t in texts]


def tokenize_template(tokenizer, template: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes an infilling template such as "a [MASK] square above a small [MASK] circle".

    The text between blanks is normalised like a caption; each ``[MASK]`` is one token position to fill.
    The template fixes the caption's length: [CLS], the given tokens and blanks, [SEP], then padding
    to ``max_length``; padding and specials are given too, so a blank may only be filled with one word
    piece or left empty (filled with a special token, dropped when decoding). Write several ``[MASK]``
    to leave room for several words.

    Returns:
      ``(tokens, given)``, int32 of shape ``(max_length,)``; ``given`` is 0 at the blanks, 1 elsewhere.
    """
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"template must be a non-empty string, got {template!r}")
    parts = _BLANK_RE.split(template)
    if len(parts) < 2:
        raise ValueError(f"template {template!r} has no {BLANK} blank to fill")
    blank_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.pad_token_id
    ids, given = [tokenizer.cls_token_id], [1]
    for i, part in enumerate(parts):
        if i:
            ids.append(blank_id)
            given.append(0)
        words = tokenizer(normalize_caption(part), add_special_tokens=False)["input_ids"] if part.strip() else []
        ids += words
        given += [1] * len(words)
    ids.append(tokenizer.sep_token_id)
    given.append(1)
    if len(ids) > max_length:
        raise ValueError(f"template {template!r} is {len(ids)} tokens with [CLS] and [SEP]; captions hold at "
                         f"most max_length={max_length}")
    pad = max_length - len(ids)
    return (np.asarray(ids + [tokenizer.pad_token_id] * pad, np.int32), np.asarray(given + [1] * pad, np.int32))
