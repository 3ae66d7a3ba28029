"""Finding and reading a dataset's own files in a manual directory, local or on a bucket.

The builders of real datasets (`karpathy_captions`, `cub_captions`) read the files a researcher already has,
laid out as they come from their sources. Everything here goes through `etils.epath`, which reads `gs://`
(and `s3://`, ...) through `tf.io.gfile` when TensorFlow is installed: no local-only `open()`.

A file or folder that is not where it should be is a `LayoutError` naming the dataset, every path looked
at and what belongs there, raised before TFDS starts writing anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath


class LayoutError(FileNotFoundError):
    """A file or folder a builder needs is missing from its manual directory."""


def manual_root(manual_dir, dataset: str, instructions: str) -> epath.Path:
    """`manual_dir` as a path, checked to be a directory."""
    if not manual_dir:
        raise LayoutError(f"{dataset}: no manual directory given; pass --manual_dir DIR. {instructions}")
    root = epath.Path(manual_dir)
    if not root.is_dir():
        raise LayoutError(f"{dataset}: manual directory {root} does not exist or is not a directory. "
                          f"{instructions}")
    return root


def find(roots: Sequence[epath.Path], names: Sequence[str], *, dataset: str, what: str,
         directory: bool = False) -> epath.Path:
    """The first `root / name` that exists (as a directory if `directory`), trying roots in order.

    Raises LayoutError naming every path tried and `what` should be there.
    """
    tried = []
    for root in roots:
        for name in names:
            path = root / name
            if path.is_dir() if directory else (path.exists() and not path.is_dir()):
                return path
            tried.append(str(path))
    kind = "folder" if directory else "file"
    raise LayoutError(f"{dataset}: missing {kind}: {what}; looked for {', '.join(tried)}")


def read_json(path: epath.Path, dataset: str) -> Any:
    """A JSON file's content; a ValueError naming the file and position if it does not parse."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{dataset}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg})") from None


def read_lines(path: epath.Path) -> list[str]:
    """The file's lines, stripped, blank ones dropped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_table(path: epath.Path, columns: int, dataset: str) -> list[list[str]]:
    """A whitespace-separated table: each non-blank line split into exactly `columns` fields (the last one
    keeps any further spaces); a ValueError naming the file and line otherwise."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise ValueError(f"{dataset}: {path}:{number}: expected {columns} fields separated by spaces, "
                             f"got {line.strip()!r}")
        rows.append(fields)
    return rows


def captioning_features(image_fields=(), caption_fields=()) -> tfds.features.FeaturesDict:
    """The features of a captioning dataset built from image files, as `coco_captions` has them: `image` (the
    file's bytes, any size), `image/id`, `image/filename`, `captions` (`id`, `text`); plus further text fields
    of the image (`image_fields`) and of each caption (`caption_fields`)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "image/id": np.int64,
        "image/filename": tfds.features.Text(),
        **{f"image/{name}": tfds.features.Text() for name in image_fields},
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text(),
                                            **{name: tfds.features.Text() for name in caption_fields}}),
    })


def read_image_bytes(path: epath.Path, dataset: str, what: str) -> bytes:
    """An image file's bytes as stored (decoded later, by the input pipeline's bad-record rules)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LayoutError(f"{dataset}: missing image {path} ({what})") from None
