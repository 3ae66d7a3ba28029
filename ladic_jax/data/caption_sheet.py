"""Contact sheets of captioned images, so that a person can check captions against pictures by eye.

`render_sheet` lays out images (upscaled so small synthetic images are readable) in a grid with their
captions printed underneath; `write_dataset_sheet` does this for the first examples of a split of any TFDS
captioning dataset with `coco_captions`-style features (`image`, `captions/text`, optionally `image/id`).
Given a file of generated captions (JSON lines with `image_id` and `caption`, as the evaluator writes
them), each tile shows the generated caption above the references, for the images that have one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ladic_jax import config as config_lib
from ladic_jax.data import bad_records
from ladic_jax.data import datasets

_PAD = 8
_LINE_SPACING = 3
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_GENERATED = (20, 70, 200)


@dataclasses.dataclass(frozen=True)
class SheetItem:
    """One tile of the sheet: an image, its reference captions, a short label (e.g. the image id) and
    optionally a generated caption to compare with them."""

    image: np.ndarray
    captions: Sequence[str]
    label: str = ""
    generated: str | None = None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # A scalable TrueType font bundled with Pillow.
    except (ImportError, OSError, TypeError):  # Pillow built without FreeType: small bitmap font.
        return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels (a long word gets its own line)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines or [""]


def _fit(image: np.ndarray, tile: int) -> Image.Image:
    """Scales an image to fit a tile x tile box: integer nearest-neighbour upscaling keeps pixels sharp."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8).squeeze()).convert("RGB")
    w, h = picture.size
    factor = tile / max(w, h)
    if factor >= 1:
        k = max(1, int(factor))
        return picture.resize((w * k, h * k), Image.Resampling.NEAREST)
    return picture.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)


def render_sheet(items: Sequence[SheetItem], columns: int = 4, tile: int = 256, font_size: int = 15,
                 max_captions: int = 5) -> Image.Image:
    """A grid of `items`, each image fitted into `tile` pixels with up to `max_captions` captions below."""
    if not items:
        raise ValueError("render_sheet: no items to draw")
    if columns < 1 or tile < 16 or font_size < 6 or max_captions < 1:
        raise ValueError(f"render_sheet: need columns >= 1, tile >= 16, font_size >= 6, max_captions >= 1; "
                         f"got columns={columns}, tile={tile}, font_size={font_size}, "
                         f"max_captions={max_captions}")
    font, small = _font(font_size), _font(max(6, font_size - 3))
    line_height = font_size + _LINE_SPACING
    blocks = []
    for item in items:
        lines = []
        for k, caption in enumerate(item.captions[:max_captions]):
            # Continuation lines are indented under the caption number.
            wrapped = _wrap(f"{k + 1}. {caption}", font, tile - font.getlength("    "))
            lines.extend([(wrapped[0], font, _TEXT)] + [("    " + w, font, _TEXT) for w in wrapped[1:]])
        if item.generated is not None:
            wrapped = _wrap(f"generated: {item.generated}", font, tile - font.getlength("    "))
            lines[:0] = [(wrapped[0], font, _GENERATED)] + [("    " + w, font, _GENERATED)
                                                            for w in wrapped[1:]]
        if item.label:
            lines.insert(0, (item.label, small, _MUTED))
        blocks.append((_fit(item.image, tile), lines))

    columns = min(columns, len(items))
    cell_w = tile + 2 * _PAD
    rows = [blocks[i:i + columns] for i in range(0, len(blocks), columns)]
    row_heights = [max(tile + _PAD + len(lines) * line_height for _, lines in row) + 2 * _PAD for row in rows]
    sheet = Image.new("RGB", (columns * cell_w, sum(row_heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    top = 0
    for row, height in zip(rows, row_heights):
        for c, (picture, lines) in enumerate(row):
            left = c * cell_w + _PAD
            corner = (left + (tile - picture.width) // 2, top + _PAD + (tile - picture.height) // 2)
            sheet.paste(picture, corner)
            y = top + _PAD + tile + _PAD
            for text, f, colour in lines:
                draw.text((left, y), text, font=f, fill=colour)
                y += line_height
        top += height
        draw.line([(0, top - 1), (sheet.width, top - 1)], fill=(220, 220, 220))
    return sheet


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _builder(dataset: str, data_dir: str):
    """The TFDS builder for `dataset` ("name" or "name/config"), with a short error for an unknown name."""
    import difflib

    import tensorflow_datasets as tfds  # Imported here: rendering a sheet of arrays needs no TF.

    datasets.register(dataset)
    try:
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        name = dataset.split("/")[0]
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown TFDS dataset {dataset!r}{hint}") from None


def read_generated(path: str) -> dict[int, str]:
    """Generated captions by image id from a JSON-lines file of records with `image_id` and `caption`; where a
    record carries the evaluator's semantic verdict (shapes data: "ok" or what is wrong) it follows the caption
    in brackets."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file {path!r} does not exist")
    generated = {}
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                verdict = f"  [{record['semantic']}]" if record.get("semantic") else ""
                generated[int(record["image_id"])] = str(record["caption"]) + verdict
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_number}: expected a JSON object with an integer image_id "
                                 f"and a caption ({type(e).__name__}: {e})") from None
    if not generated:
        raise ValueError(f"captions file {path!r} holds no records")
    return generated


def load_items(dataset: str, split: str, data_dir: str, num: int,
               generated: Mapping[int, str] | None = None,
               max_pixels: int = config_lib.DEFAULT_MAX_IMAGE_PIXELS) -> list[SheetItem]:
    """The first `num` examples of `split` of a prepared TFDS captioning dataset, as sheet items.

    `dataset` is a TFDS name, optionally with a config ("shapes_captions/long"). With `generated` (captions
    by image id), only the examples that have a generated caption are taken, and it is shown with them.
    Raises FileNotFoundError if the dataset is not prepared in `data_dir`, ValueError for an unknown name or
    split, missing features, or generated captions that match no image of the split.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    builder = _builder(dataset, data_dir)
    features = builder.info.features
    if "image" not in features or "captions" not in features:
        raise ValueError(f"dataset {dataset!r} is not a captioning dataset: it needs 'image' and 'captions' "
                         f"features, it has {sorted(features.keys())}")
    if generated is not None and "image/id" not in features:
        raise ValueError(f"dataset {dataset!r} has no 'image/id' feature to match generated captions with")
    try:  # Images decoded by the input pipeline's rules: a bad one is a labelled blank tile, not an error.
        wanted = {"image": True, "captions": {"text": True}, **({"image/id": True} if "image/id" in features else {})}
        ds = builder.as_dataset(split=split, decoders=tfds.decode.PartialDecoding(
            wanted, decoders={"image": tfds.decode.SkipDecoding()}))
    except AssertionError as e:  # What TFDS raises when the data is not there.
        raise FileNotFoundError(f"dataset {dataset!r} is not prepared in data_dir {data_dir!r} (looked in "
                                f"{builder.data_dir}); build it first: {datasets.build_hint(dataset)}") from e
    if generated is None:
        ds = ds.take(num)
    else:  # Keep the examples that were captioned; decode only those images.
        ids = tf.constant(sorted(generated), dtype=tf.int64)
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["image/id"], ids))).take(num)
    items = []
    for example in tfds.as_numpy(ds):
        image_id = int(example["image/id"]) if "image/id" in example else None
        image, flags = bad_records.decode_image(example["image"], max_pixels)
        skipped = bad_records.skip_reason(flags)
        label = "" if image_id is None else f"id {image_id}"
        label += f" (skipped: {skipped})" if skipped else ""
        items.append(SheetItem(image, [_text(t) for t in example["captions"]["text"]], label=label.strip(),
                               generated=None if generated is None else generated[image_id]))
    if not items and generated is not None:
        raise ValueError(f"none of the {len(generated)} generated captions matches an image id of split "
                         f"{split!r} of dataset {dataset!r} (e.g. id {next(iter(generated))})")
    if not items:
        raise ValueError(f"split {split!r} of dataset {dataset!r} is empty")
    return items


def write_dataset_sheet(dataset: str, split: str, data_dir: str, out: str, num: int = 16, columns: int = 4,
                        tile: int = 256, max_captions: int = 5, generated_path: str | None = None
                        ) -> Image.Image:
    """Renders the first `num` examples of a TFDS captioning split with their captions and saves to `out`.

    With `generated_path` (JSON lines of image_id and caption) the images captioned there are shown, each
    with its generated caption above the references.
    """
    generated = None if generated_path is None else read_generated(generated_path)
    items = load_items(dataset, split, data_dir, num, generated)
    sheet = render_sheet(items, columns=columns, tile=tile, max_captions=max_captions)
    sheet.save(out)
    return sheet
