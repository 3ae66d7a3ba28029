"""Bad records: what the input pipeline does with each kind, stated in one place.

Every record is decoded on its own by `decode_image` and `check_captions`, which never raise:
a record is used as it is, used after a *conversion*, or *skipped*. Nothing in a record stops the
stream. The rules, and the count each one adds to (`Counts`):

  input                                               rule                              count
  --------------------------------------------------  --------------------------------  ----------------
  no image in the bytes (empty, random, unknown       skip                              corrupt_image
  format) or one the decoder rejects (broken header
  or data)
  a file cut short: the decoder reports truncation,   skip (part of an image is never   truncated_image
  or it fails and the end marker is missing (JPEG     used)
  EOI, PNG IEND)
  the header declares more than `max_image_pixels`    skip, before any pixel is         huge_image
  (default 4096 x 4096), not a JPEG or a JPEG still   decoded
  over at 1/8
  a JPEG over `max_image_pixels`                      decode at 1/2, 1/4 or 1/8, the    downscaled
                                                      least reduction that fits
                                                      (libjpeg DCT scaling: memory for
                                                      the small image only)
  16/32-bit or float grey samples                     scale to 8 bits, round(v / 257)   16bit
                                                      (16-bit), before the rest
  grayscale (1-bit, L, LA)                            replicate to R = G = B            grayscale
  palette                                             look the colours up               palette
  alpha channel or palette transparency               composite on white (PIL's         alpha
                                                      alpha_composite): c a / 255 +
                                                      (255 - a), rounded
  CMYK (and YCCK) JPEG                                convert to RGB (PIL; Adobe-       cmyk
                                                      inverted inks as Photoshop writes)
  invalid UTF-8 in a caption                          each invalid sequence becomes     caption_utf8
                                                      U+FFFD, which normalisation
                                                      makes a space
  a caption that normalises to nothing (empty,        drop that caption                 empty_caption
  blank, only punctuation or symbols)
  no caption left (or none at all)                    skip                              no_caption

Other formats PIL reads (GIF: first frame, WebP, BMP, TIFF, ...) are decoded likewise. EXIF
orientation is not applied; 16-bit colour PNGs come out of PIL as 8-bit (the high byte), not
counted. A skipped record counts under its first reason in the order of `SKIP_REASONS` only; a
kept record under each of its conversions. `Counts` also has `examples`, the records read.

What a skip means downstream (`ladic_jax.data.pipeline`): in training, batch `k` is still made
from records `k * B .. k * B + B - 1` of the stream; the slot of a skipped record takes a copy of
a kept record of the same batch (the kept ones in order, cycled), or of the next batch that has
one when all `B` are bad, so that resuming at a step stays exact. A split without any usable
record is rejected (ValueError naming it). In evaluation a skipped record is a masked row that
keeps its `image_id`; it is not scored and is listed by id with its reason. The counts reach
the metrics log as `data/<count>` (training, per log interval) and `eval_s<N>/data/<count>`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image, JpegImagePlugin

from ladic_jax.data import image_files
from ladic_jax.data import text

__all__ = [
    "SKIP_REASONS",
    "CONVERSIONS",
    "SKIP",
    "CONVERT",
    "SKIP_MASK",
    "skip_reason",
    "Counts",
    "decode_image",
    "check_captions",
]

# Skip reasons, in the order that decides which one a record is counted under.
SKIP_REASONS = ("corrupt_image", "truncated_image", "huge_image", "no_caption")
CONVERSIONS = ("downscaled", "16bit", "grayscale", "palette", "alpha", "cmyk", "caption_utf8",
               "empty_caption")
# A record's flags: an int bitmask of its skip reasons (low byte) and its conversions.
SKIP = {name: 1 << i for i, name in enumerate(SKIP_REASONS)}
CONVERT = {name: 1 << (8 + i) for i, name in enumerate(CONVERSIONS)}
SKIP_MASK = sum(SKIP.values())

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_REDUCTIONS = (2, 4, 8)  # What libjpeg can decode at, with memory for the output only.
_TAIL = 1024  # Bytes searched for the end marker of a file the decoder rejected.
_NO_IMAGE = np.zeros((1, 1, 3), np.uint8)


def skip_reason(flags: int) -> str | None:
    """The reason a record with these flags is skipped (the first in `SKIP_REASONS`), or None."""
    for name in SKIP_REASONS:
        if flags & SKIP[name]:
            return name
    return None


class Counts:
    """Tallies of records: `examples`, `skipped_<reason>` and `converted_<conversion>`."""

    KEYS = (("examples",) + tuple(f"skipped_{r}" for r in SKIP_REASONS)
            + tuple(f"converted_{c}" for c in CONVERSIONS))

    def __init__(self):
        self._n = dict.fromkeys(self.KEYS, 0)

    def add(self, flags) -> None:
        """Counts records with these flags (one int per record)."""
        for f in np.asarray(flags, np.int64).reshape(-1).tolist():
            self._n["examples"] += 1
            reason = skip_reason(f)
            if reason is not None:
                self._n[f"skipped_{reason}"] += 1
                continue
            for name in CONVERSIONS:
                if f & CONVERT[name]:
                    self._n[f"converted_{name}"] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(self._n)


# --------------------------------------------------------------------------- images


class _TooBig(Exception):
    pass


def decode_image(data: bytes, max_pixels: int) -> tuple[np.ndarray, int]:
    """Encoded image bytes -> (uint8 (H, W, 3), flags) by the rules above; never raises.

    A skipped image comes back as a 1x1 black dummy with its skip reason in the flags.
    """
    try:
        image, done = _decode(data, max_pixels)
    except (_TooBig, Image.DecompressionBombError):
        return _NO_IMAGE, SKIP["huge_image"]
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the record is bad, not the run.
        return _NO_IMAGE, SKIP["truncated_image" if _looks_truncated(data, e) else "corrupt_image"]
    flags = 0
    for name in done:
        flags |= CONVERT[name]
    return image, flags


def _open(data: bytes) -> Image.Image:
    fp = io.BytesIO(data)
    if data.startswith(_JPEG_MAGIC):
        # Not `Image.open`: its decompression-bomb check would refuse a huge JPEG before DCT
        # scaling can decode it small. The size is checked against `max_pixels` instead.
        return JpegImagePlugin.JpegImageFile(fp)
    return Image.open(fp)  # Lazy: reads the header only.


def _decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, tuple[str, ...]]:
    with _open(data) as im:
        w, h = im.size
        reduced = ()
        if w * h > max_pixels:
            fits = [r for r in _JPEG_REDUCTIONS if -(-w // r) * -(-h // r) <= max_pixels]
            if im.format != "JPEG" or not fits:
                raise _TooBig
            r = fits[0]
            im.draft(im.mode, (max(1, w // r), max(1, h // r)))  # Chooses the scale 1/r.
            if im.size[0] * im.size[1] > max_pixels:
                raise _TooBig
            reduced = ("downscaled",)
        im.load()
        rgb, done = image_files.to_rgb(im)
    return np.ascontiguousarray(rgb), reduced + done


def _looks_truncated(data: bytes, error: Exception) -> bool:
    if "truncated" in str(error).lower():
        return True
    if data.startswith(_JPEG_MAGIC):
        return b"\xff\xd9" not in data[-_TAIL:]
    if data.startswith(_PNG_MAGIC):
        return b"IEND" not in data[-_TAIL:]
    return False


# --------------------------------------------------------------------------- captions


def check_captions(captions: Iterable[bytes | str]) -> tuple[list[str], int]:
    """A record's captions -> (the kept ones, normalised by `text.normalize_caption`; flags)."""
    kept, flags, dropped = [], 0, False
    for c in captions:
        if isinstance(c, bytes):
            try:
                c = c.decode("utf-8")
            except UnicodeDecodeError:
                c = c.decode("utf-8", errors="replace")
                flags |= CONVERT["caption_utf8"]
        c = text.normalize_caption(c)
        if c:
            kept.append(c)
        else:
            dropped = True
    if not kept:
        flags |= SKIP["no_caption"]
    elif dropped:
        flags |= CONVERT["empty_caption"]
    return kept, flags
