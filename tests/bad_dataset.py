"""A tiny TFDS captioning dataset full of bad records, and what the input pipeline must make of each.

Shared by tests/data/test_bad_records.py and tests/training/test_trainer.py (tests/ is on sys.path
through tests/conftest.py, whose `bad_data_dir` fixture builds it once). Every expectation is written
down from what the bytes hold (an alpha blend on white, a grey level, a 16-bit value / 257, ...),
never read back through the code.

Splits (features as in coco_captions; image ids TRAIN_BASE + k and TEST_BASE + k, k = case index):
  train, test: one record per case in CASES (24 records).
  mostly_bad: 7 corrupt records and one good one (whole batches of bad records).
  all_bad: 4 records, each bad for another reason.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SIZE = 16  # Native size of the images that are kept unresized.
MAX_PIXELS = 32 * 32  # config.input.max_image_pixels of the tests.
TRAIN_BASE, TEST_BASE, MOSTLY_BAD_BASE, ALL_BAD_BASE = 1000, 2000, 3000, 4000

_WORDS = ["good", "image", "a", "caf", "red", "square", "other"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + [str(d) for d in range(10)]
         + [f"##{d}" for d in range(10)])


def encode(array_or_image, fmt: str, **kw) -> bytes:
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def rgb_pixels(k: int) -> np.ndarray:
    """A 16x16 picture that names its case: R = 10 k, G a ramp along x, B = 255 - G."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[..., 0] = 10 * k
    img[..., 1] = (np.arange(SIZE) * 15)[None, :]
    img[..., 2] = 255 - img[..., 1]
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png() -> bytes:
    """A PNG whose header declares 20000 x 20000 RGB pixels (1.2 GB decoded), with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b""))


def huge_jpeg() -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare 20000 x 20000 pixels."""
    data = bytearray(encode(rgb_pixels(1), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    return bytes(data)


def corrupt_png_data(k: int) -> bytes:
    """A PNG with one byte of its pixel data changed: the IDAT checksum no longer matches."""
    data = bytearray(encode(rgb_pixels(k), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    return bytes(data)


# Pixels of the converted images, from what the files store.
GREY = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint8)
RGBA = np.zeros((SIZE, SIZE, 4), np.uint8)
RGBA[..., :3] = (200, 100, 0)
RGBA[..., 3] = (np.arange(SIZE) * 17)[None, :]  # 0 (transparent) .. 255 (opaque)
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 10)]
PALETTE_ALPHA = [255, 128, 0, 255]
PALETTE_INDEX = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4).astype(np.uint8)
GREY16 = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 257).astype(np.uint16)  # 0 .. 65535
CMYK_INKS = {"left": (255, 0, 0, 0), "right": (0, 0, 0, 255)}  # pure cyan | pure black
DOWNSCALED_COLOUR = (30, 160, 90)


def _on_white(rgb, alpha):
    rgb, alpha = np.asarray(rgb, np.float64), np.asarray(alpha, np.float64)[..., None]
    return np.round((rgb * alpha + 255.0 * (255.0 - alpha)) / 255.0)


def expected_pixels(name: str) -> tuple[np.ndarray, float] | None:
    """(RGB float array at SIZE x SIZE, tolerance) that the pipeline must give for a kept case."""
    if name == "grayscale":
        return np.repeat(GREY[..., None], 3, -1).astype(float), 0
    if name == "rgba":
        return _on_white(RGBA[..., :3], RGBA[..., 3]), 0
    if name == "palette_alpha":
        colours = np.array(PALETTE)[PALETTE_INDEX]
        return _on_white(colours, np.array(PALETTE_ALPHA)[PALETTE_INDEX]), 0
    if name == "gray16":
        return np.repeat(np.round(GREY16 / 257.0)[..., None], 3, -1), 0
    if name == "cmyk":
        out = np.zeros((SIZE, SIZE, 3))
        out[:, : SIZE // 2] = (0, 255, 255)  # cyan ink: no red
        out[:, SIZE // 2:] = (0, 0, 0)
        return out, 40  # JPEG ringing at the ink edge
    if name == "downscaled_jpeg":
        return np.broadcast_to(np.array(DOWNSCALED_COLOUR, float), (SIZE, SIZE, 3)), 4
    if name in ("webp", "gif"):
        return rgb_pixels(CASE_INDEX[name]).astype(float), 0
    if name.startswith("good") or name in ("empty_caption", "non_utf8_caption"):
        return rgb_pixels(CASE_INDEX[name]).astype(float), 0
    return None


def _cmyk_jpeg() -> bytes:
    inks = np.zeros((SIZE, SIZE, 4), np.uint8)
    inks[:, : SIZE // 2] = CMYK_INKS["left"]
    inks[:, SIZE // 2:] = CMYK_INKS["right"]
    return encode(Image.fromarray(inks, "CMYK"), "JPEG", quality=95)


def _palette_png() -> bytes:
    im = Image.fromarray(PALETTE_INDEX, "P")
    im.putpalette([c for rgb in PALETTE for c in rgb])
    return encode(im, "PNG", transparency=bytes(PALETTE_ALPHA))


def _gif(k: int) -> bytes:
    # Few colours, so that the GIF palette holds them exactly.
    return encode(Image.fromarray(rgb_pixels(k)).quantize(colors=256, method=Image.Quantize.MAXCOVERAGE),
                  "GIF")


def good_captions(image_id: int) -> list[str]:
    return [f"good image {image_id}", f"other image {image_id}"]  # Normalised already.


# (name, image bytes of case k, image id -> (stored captions, the normalised ones kept),
#  skip reason or None, conversions)
def _cases():
    jpeg = encode(rgb_pixels(4), "JPEG", quality=90)
    png = encode(rgb_pixels(5), "PNG")
    def good(i): return good_captions(i), good_captions(i)
    return [
        ("garbage", lambda k: b"this is not an image at all", good, "corrupt_image", set()),
        ("empty_bytes", lambda k: b"", good, "corrupt_image", set()),
        ("corrupt_jpeg", lambda k: b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x13" * 200 + b"\xff\xd9", good,
         "corrupt_image", set()),
        ("corrupt_png", corrupt_png_data, good, "corrupt_image", set()),
        ("truncated_jpeg", lambda k: jpeg[: len(jpeg) // 2], good, "truncated_image", set()),
        ("truncated_png", lambda k: png[: len(png) - 40], good, "truncated_image", set()),
        ("huge_png", lambda k: huge_png(), good, "huge_image", set()),
        ("huge_jpeg", lambda k: huge_jpeg(), good, "huge_image", set()),
        ("downscaled_jpeg", lambda k: encode(np.full((48, 64, 3), DOWNSCALED_COLOUR, np.uint8), "JPEG",
                                             quality=95), good, None, {"downscaled"}),
        ("grayscale", lambda k: encode(GREY, "PNG"), good, None, {"grayscale"}),
        ("rgba", lambda k: encode(RGBA, "PNG"), good, None, {"alpha"}),
        ("palette_alpha", lambda k: _palette_png(), good, None, {"palette", "alpha"}),
        ("gray16", lambda k: encode(GREY16, "PNG"), good, None, {"16bit", "grayscale"}),
        ("cmyk", lambda k: _cmyk_jpeg(), good, None, {"cmyk"}),
        ("webp", lambda k: encode(rgb_pixels(k), "WEBP", lossless=True), good, None, set()),
        ("gif", _gif, good, None, {"palette"}),
        ("blank_captions", lambda k: encode(rgb_pixels(k), "PNG"),
         lambda i: (["", "   ", " .!? ", "\t"], []), "no_caption", set()),
        ("no_captions", lambda k: encode(rgb_pixels(k), "PNG"), lambda i: ([], []), "no_caption", set()),
        ("empty_caption", lambda k: encode(rgb_pixels(k), "PNG"),
         lambda i: (["  ", f"good image {i}", "..."], [f"good image {i}"]), None, {"empty_caption"}),
        ("non_utf8_caption", lambda k: encode(rgb_pixels(k), "PNG"),
         lambda i: ([b"A caf\xe9 red square", f"good image {i}".encode()],
                    ["a caf red square", f"good image {i}"]), None, {"caption_utf8"}),
    ] + [(f"good_{j}", lambda k: encode(rgb_pixels(k), "PNG"), good, None, set()) for j in range(4)]


CASES = _cases()
CASE_INDEX = {c[0]: k for k, c in enumerate(CASES)}
N = len(CASES)


MOSTLY_BAD = ["garbage"] * 3 + ["good_0"] + ["corrupt_png"] * 4
ALL_BAD = ["garbage", "truncated_png", "huge_png", "no_captions"]


def case_of(image_id: int) -> str:
    """The case a record is, from its id."""
    base, j = divmod(image_id, 1000)
    return {3: MOSTLY_BAD, 4: ALL_BAD}.get(base, [c[0] for c in CASES])[j]


def expected_counts(case_names) -> dict[str, int]:
    """The pipeline's counts (`bad_records.Counts`) for visiting these cases once each."""
    from ladic_jax.data import bad_records

    out = dict.fromkeys(bad_records.Counts.KEYS, 0)
    for name in case_names:
        _, _, _, reason, conversions = CASES[CASE_INDEX[name]]
        out["examples"] += 1
        if reason:
            out[f"skipped_{reason}"] += 1
        else:
            for c in conversions:
                out[f"converted_{c}"] += 1
    return out


def kept_ids(base: int) -> set[int]:
    return {base + k for k, c in enumerate(CASES) if c[3] is None}


class LadicBadCaptions(tfds.core.GeneratorBasedBuilder):
    """Features as in `coco_captions`; the images are stored as the bytes given (no re-encoding)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(TRAIN_BASE, [c[0] for c in CASES]),
            "test": self._generate_examples(TEST_BASE, [c[0] for c in CASES]),
            "mostly_bad": self._generate_examples(MOSTLY_BAD_BASE, MOSTLY_BAD),
            "all_bad": self._generate_examples(ALL_BAD_BASE, ALL_BAD),
        }

    def _generate_examples(self, base, names):
        for j, name in enumerate(names):
            image_id = base + j
            _, image, captions, _, _ = CASES[CASE_INDEX[name]]
            texts = captions(image_id)[0]
            yield f"{image_id}", {
                "image": image(CASE_INDEX[name]),
                "image/id": image_id,
                "captions": {"id": [image_id * 10 + i for i in range(len(texts))], "text": texts},
            }


def references(image_id: int) -> list[str]:
    """What the evaluation must score a kept record against."""
    return CASES[CASE_INDEX[case_of(image_id)]][2](image_id)[1]
