"""Tiny fake copies of the real captioning datasets, written in their true on-disk layouts.

`write_karpathy(root, source)` writes Karpathy's `dataset_<source>.json` (his format: `images` with
`filename`, `split`, `imgid`, `sentids`, `sentences` of `raw`, `tokens`, `imgid`, `sentid`; COCO's also
`filepath` and `cocoid`) and the image files in the folder the source uses (COCO `train2014/` and
`val2014/`, Flickr8k `Images/`, Flickr30k `flickr30k-images/`); `write_cub(root)` writes CUB_200_2011's
`images.txt`, `train_test_split.txt` and `images/<class>/<file>.jpg` and Reed et al.'s
`cvpr2016_cub/text_c10/<class>/<file>.txt`, `trainvalclasses.txt`, `testclasses.txt`.

Each returns what a correct builder must produce: `{split: {image_id: Expected}}`. Files are written through
`etils.epath`, so `root` may be any path TensorFlow's file systems take (the tests also use `ram://`).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from etils import epath
from PIL import Image

# Karpathy splits and image counts per split.
KARPATHY_SPLITS = {
    "coco": {"train": 3, "restval": 2, "val": 2, "test": 3},
    "flickr8k": {"train": 3, "val": 2, "test": 2},
    "flickr30k": {"train": 3, "val": 2, "test": 2},
}
# A Flickr photo in both Flickr8k (test split) and Flickr30k (train split): the union keeps Flickr30k's.
SHARED_PHOTO = 3_301_744_153
# Every test split holds one file that is not an image: the bad-record rules must skip and count it.
CORRUPT = b"this is not a JPEG"
_WORDS = ("a", "red", "bus", "dog", "runs", "on", "the", "grass", "near", "two", "people", "bird", "with",
          "yellow", "wings", "sits", "branch")


@dataclasses.dataclass(frozen=True)
class Expected:
    filename: str
    captions: tuple[str, ...]  # raw sentences as written
    tokens: tuple[str, ...]
    image_bytes: bytes
    caption_ids: tuple[int, ...]


def _jpeg(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> bytes:
    h, w = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _sentence(rng: np.random.Generator) -> tuple[str, list[str]]:
    tokens = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(4, 9)))]
    raw = " ".join(tokens).capitalize() + (" ." if rng.random() < 0.5 else ". ")
    return raw, tokens


def write_karpathy(root, source: str, seed: int = 0) -> dict[str, dict[int, Expected]]:
    """Karpathy's split file and the images of `source` (coco, flickr8k, flickr30k) under `root`."""
    root = epath.Path(root)
    rng = np.random.default_rng([seed, len(source)])
    records, expected, sentid = [], {}, 0
    for split, count in KARPATHY_SPLITS[source].items():
        expected[split] = {}
        for k in range(count):
            imgid = len(records)
            if source == "coco":
                image_id = 100_000 + 37 * imgid
                folder = "train2014" if split == "train" else "val2014"
                filename = f"COCO_{folder}_{image_id:012d}.jpg"
            else:
                shared = (source == "flickr8k" and split == "test" and k == 1) or (
                    source == "flickr30k" and split == "train" and k == 2)
                image_id = SHARED_PHOTO if shared else 1_000_000_000 + 1000 * len(source) + imgid
                folder = "Images" if source == "flickr8k" else "flickr30k-images"
                filename = f"{image_id}_5e0a1b2c3d.jpg" if source == "flickr8k" else f"{image_id}.jpg"
            n_sentences = 6 if k == 0 and split == "test" else 5  # COCO has images with 6 or 7 captions.
            sentences = []
            for _ in range(n_sentences):
                raw, tokens = _sentence(rng)
                sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            if split == "test" and k == count - 1:
                data = CORRUPT
            else:
                data = _jpeg(rng, (int(rng.integers(20, 48)), int(rng.integers(20, 48))),
                             mode="L" if k == 1 else "RGB")
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / filename).write_bytes(data)
            record = {"filename": filename, "imgid": imgid, "sentences": sentences, "split": split,
                      "sentids": [s["sentid"] for s in sentences]}
            if source == "coco":
                record.update(filepath=folder, cocoid=image_id)
            records.append(record)
            expected[split][image_id] = Expected(
                filename, tuple(s["raw"].strip() for s in sentences),
                tuple(" ".join(s["tokens"]) for s in sentences), data, tuple(s["sentid"] for s in sentences))
    (root / f"dataset_{source}.json").write_text(json.dumps({"images": records, "dataset": source}))
    return expected


# CUB: 4 classes; classes 1 and 3 are Reed's train+val classes, 2 and 4 his test classes.
CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani")
CUB_TRAINVAL_CLASSES = (CUB_CLASSES[0], CUB_CLASSES[2])
CUB_TEST_CLASSES = (CUB_CLASSES[1], CUB_CLASSES[3])
CUB_PER_CLASS = 3


def write_cub(root, seed: int = 0) -> dict[str, dict[str, dict[int, Expected]]]:
    """CUB_200_2011 and Reed et al.'s cvpr2016_cub under `root`; expected records by config and split."""
    root = epath.Path(root)
    cub, reed = root / "CUB_200_2011", root / "cvpr2016_cub"
    rng = np.random.default_rng([seed, 200])
    index_lines, split_lines = [], []
    by_config = {"default": {"train": {}, "test": {}}, "unseen_classes": {"train": {}, "test": {}}}
    image_id = 0
    for c, cls in enumerate(CUB_CLASSES):
        (cub / "images" / cls).mkdir(parents=True, exist_ok=True)
        (reed / "text_c10" / cls).mkdir(parents=True, exist_ok=True)
        for k in range(CUB_PER_CLASS):
            image_id += 1
            stem = f"{cls.split('.')[1]}_{k + 1:04d}_{7000 + image_id}"
            relpath = f"{cls}/{stem}.jpg"
            data = CORRUPT if (c == 1 and k == 1) else _jpeg(rng, (int(rng.integers(24, 40)), 32))
            (cub / "images" / relpath).write_bytes(data)
            captions = [_sentence(rng)[0].strip().lower() for _ in range(10)]
            (reed / "text_c10" / cls / f"{stem}.txt").write_text("\n".join(captions) + "\n")
            is_train = k != 1  # CUB's own split: images 1 and 3 of each class train, 2 test.
            index_lines.append(f"{image_id} {relpath}")
            split_lines.append(f"{image_id} {int(is_train)}")
            record = Expected(relpath, tuple(captions), (), data, tuple(image_id * 100 + j for j in range(10)))
            by_config["default"]["train" if is_train else "test"][image_id] = record
            by_config["unseen_classes"]["train" if cls in CUB_TRAINVAL_CLASSES else "test"][image_id] = record
    (cub / "images.txt").write_text("\n".join(index_lines) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    (reed / "trainvalclasses.txt").write_text("\n".join(CUB_TRAINVAL_CLASSES) + "\n")
    (reed / "testclasses.txt").write_text("\n".join(CUB_TEST_CLASSES) + "\n")
    return by_config


def write_all(root, seed: int = 0) -> dict[str, dict]:
    """Every fake dataset under one manual directory: Karpathy's three sets in their subfolders (so that both
    Flickr image folders can coexist) and CUB. Expected records by TFDS name and split."""
    root = epath.Path(root)
    out = {f"karpathy_captions/{s}": write_karpathy(root / s, s, seed) for s in KARPATHY_SPLITS}
    cub = write_cub(root, seed)
    out.update({f"cub_captions/{name}": splits for name, splits in cub.items()})
    return out
