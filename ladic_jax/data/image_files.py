"""Reading image files for captioning: any common format and mode, EXIF orientation applied.

A file that cannot be read raises ``ImageReadError`` naming the file and the reason, so that a batch
job can report it and go on with the rest.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    pass


def iter_image_paths(paths: Sequence[str]) -> Iterator[str]:
    """Files as given, and image files (by extension) found in directories, sorted, recursively."""
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in sorted(os.walk(p)):
                for f in sorted(files):
                    if f.lower().endswith(EXTENSIONS):
                        yield os.path.join(root, f)
        else:
            yield p


def read_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3): first frame of animations, EXIF orientation applied, any mode converted to RGB."""
    if not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: unreadable image ({e})") from None


def preprocess(rgb: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Resize (bicubic, to image_size x image_size) and normalise: ((x / 255) - mean) / std, float32."""
    if rgb.shape[:2] != (image_size, image_size):
        rgb = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.BICUBIC))
    x = rgb.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
