"""`karpathy_captions`: COCO, Flickr8k and Flickr30k in Karpathy's splits, built from local files (TFDS).

Importing this module registers the builder. It reads Karpathy's split files (`dataset_coco.json`,
`dataset_flickr8k.json`, `dataset_flickr30k.json`, from his `caption_datasets.zip`) and the image folders
from a manual directory (local or `gs://`), and writes TFRecords with the features of `coco_captions`, so
the one input pipeline reads it:

    ladic-data build karpathy_captions --config coco --manual_dir /data/coco --data_dir ~/tensorflow_datasets

Configs and their layouts (each file is also looked for one level down, in a folder named after the
config, e.g. `MANUAL/flickr8k/dataset_flickr8k.json`, so that one manual directory can hold all three):

  coco          dataset_coco.json, train2014/, val2014/ (the JSON's `filepath` names the folder of each
                image; also found under images/). Splits train 82,783 / restval 30,504 / val 5,000 /
                test 5,000 (the papers train on train+restval). image/id: the COCO image id.
  flickr8k      dataset_flickr8k.json, Images/ (Kaggle) or Flicker8k_Dataset/ (the original zip).
                Splits train 6,000 / val 1,000 / test 1,000. image/id: the Flickr photo id, the number
                before "_" in the file name.
  flickr30k     dataset_flickr30k.json, flickr30k-images/ (or flickr30k_images/, Images/). Splits
                train 29,000 / val 1,014 / test 1,000. image/id: the Flickr photo id (the file name).
  flickr30k+8k  both of the above; each split is the union of the two sets' splits, as CLIP-DiffusionLM
                trains. A photo in both sets is kept once, as Flickr30k has it (its split, its captions),
                so no image is in two splits and ids stay unique; the build log says how many.

Captions: every sentence of the image (COCO has 5 to 7; evaluation scores against all of them), `text`
Karpathy's `raw` sentence, `tokens` his tokenised one joined by spaces, `id` his `sentid` (in
flickr30k+8k the Flickr8k ones plus 1,000,000, to stay apart from Flickr30k's). Images are stored as the
file's bytes, not decoded: one that cannot be decoded is skipped and counted by the input pipeline's
bad-record rules (`ladic_jax.data.bad_records`). A missing image file stops the build naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from ladic_jax.data import layout

log = logging.getLogger(__name__)

NAME = "karpathy_captions"
# Split names in the order they are listed; the sets have the splits their JSON files use.
SPLITS = ("train", "restval", "val", "test")
# Added to Flickr8k's sentence ids in the flickr30k+8k union.
FLICKR8K_SENTID_OFFSET = 1_000_000

_IMAGE_FOLDERS = {
    "flickr8k": ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset"),
    "flickr30k": ("flickr30k-images", "flickr30k_images/flickr30k_images", "flickr30k_images", "Images"),
}
_INSTRUCTIONS = (
    "Put Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json from "
    "caption_datasets.zip) in the manual directory, with the images: COCO's train2014/ and val2014/ folders; "
    "Flickr8k's Images/ (or Flicker8k_Dataset/); Flickr30k's flickr30k-images/. Each set may also sit in a "
    "subfolder named after it (coco/, flickr8k/, flickr30k/). See the README, section 'Real datasets'.")


@dataclasses.dataclass(eq=False)
class KarpathyConfig(tfds.core.BuilderConfig):
    """Which of Karpathy's sets the dataset is made of (more than one: their union, the first one winning)."""

    sources: tuple[str, ...] = ()


CONFIGS = (
    KarpathyConfig(name="coco", sources=("coco",), description="MS-COCO 2014 in Karpathy's splits."),
    KarpathyConfig(name="flickr8k", sources=("flickr8k",), description="Flickr8k in Karpathy's splits."),
    KarpathyConfig(name="flickr30k", sources=("flickr30k",), description="Flickr30k in Karpathy's splits."),
    KarpathyConfig(name="flickr30k+8k", sources=("flickr30k", "flickr8k"),
                   description="Flickr30k and Flickr8k together (CLIP-DiffusionLM's Flickr30+8k)."),
)


@dataclasses.dataclass(frozen=True)
class _Image:
    split: str
    image_id: int
    path: epath.Path
    filename: str
    captions: tuple[dict, ...]


def _photo_id(filename: str, source: str, json_path: epath.Path) -> int:
    """A Flickr file name's photo id: `1000092795.jpg` (Flickr30k), `2513260012_03d33305cf.jpg` (Flickr8k)."""
    head = filename.rsplit(".", 1)[0].split("_")[0]
    if not head.isdigit():
        raise ValueError(f"{NAME}/{source}: image {filename!r} in {json_path} does not start with a Flickr "
                         f"photo id (digits), which becomes its image/id")
    return int(head)


def _field(record: dict, key: str, index: int, json_path: epath.Path):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise ValueError(f"{NAME}: {json_path}: images[{index}] has no {key!r} (Karpathy's format: filename, "
                         f"split, sentences with raw, tokens and sentid)") from None


def _read_source(root: epath.Path, source: str, sentid_offset: int) -> list[_Image]:
    """One set's images: its split file parsed and every image's folder found."""
    dataset = f"{NAME}/{source}"
    roots = [root, root / source, root / "caption_datasets"]
    json_path = layout.find(roots, [f"dataset_{source}.json"], dataset=dataset,
                            what=f"Karpathy's split file for {source}")
    content = layout.read_json(json_path, dataset)
    records = content.get("images") if isinstance(content, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{dataset}: {json_path} has no 'images' list (is it Karpathy's dataset_{source}.json?)")
    folders: dict[str, epath.Path] = {}

    def folder(name: str | None) -> epath.Path:
        if name not in folders:
            if name is None:  # Flickr: one folder, known by several names.
                folders[name] = layout.find([root / source, root], _IMAGE_FOLDERS[source], dataset=dataset,
                                            what=f"the {source} image folder", directory=True)
            else:  # COCO: the record's `filepath`, train2014 or val2014.
                folders[name] = layout.find([root, root / source, root / "images"], [name], dataset=dataset,
                                            what=f"COCO's {name} image folder (named by `filepath` in "
                                                 f"{json_path.name})", directory=True)
        return folders[name]

    images = []
    for index, record in enumerate(records):
        filename = _field(record, "filename", index, json_path)
        split = _field(record, "split", index, json_path)
        if split not in SPLITS:
            raise ValueError(f"{dataset}: {json_path}: images[{index}] ({filename}) has split {split!r}; "
                             f"expected one of {SPLITS}")
        if source == "coco":
            image_id = int(_field(record, "cocoid", index, json_path))
            path = folder(_field(record, "filepath", index, json_path)) / filename
        else:
            image_id = _photo_id(filename, source, json_path)
            path = folder(None) / filename
        captions = tuple(
            {"id": int(_field(s, "sentid", index, json_path)) + sentid_offset,
             "text": str(_field(s, "raw", index, json_path)).strip(),
             "tokens": " ".join(_field(s, "tokens", index, json_path))}
            for s in _field(record, "sentences", index, json_path))
        images.append(_Image(split, image_id, path, filename, captions))
    return images


def read_images(manual_dir, sources: tuple[str, ...]) -> dict[str, list[_Image]]:
    """All images of the config by split, in the JSON files' order, the first source winning duplicates."""
    root = layout.manual_root(manual_dir, f"{NAME}/{'+'.join(sources)}", _INSTRUCTIONS)
    by_split: dict[str, list[_Image]] = collections.defaultdict(list)
    seen: dict[int, str] = {}
    for k, source in enumerate(sources):
        offset = FLICKR8K_SENTID_OFFSET if (source == "flickr8k" and k > 0) else 0
        dropped = 0
        for image in _read_source(root, source, offset):
            if image.image_id in seen:
                if seen[image.image_id] == source:
                    raise ValueError(f"{NAME}/{source}: image id {image.image_id} ({image.filename}) occurs "
                                     f"twice in dataset_{source}.json")
                dropped += 1
                continue
            seen[image.image_id] = source
            by_split[image.split].append(image)
        if dropped:
            log.warning("%s: %d %s image(s) are also in %s and were kept once, as %s has them", NAME, dropped,
                        source, "+".join(sources[:k]), sources[0])
    return {split: by_split[split] for split in SPLITS if by_split[split]}


class KarpathyCaptions(tfds.core.GeneratorBasedBuilder):
    """COCO / Flickr8k / Flickr30k captions in Karpathy's splits, from files on disk or in a bucket."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "coco"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=("Image captioning in Karpathy's splits (Karpathy & Fei-Fei, CVPR 2015) over "
                         f"{' and '.join(self.builder_config.sources)}, read from local files."),
            features=layout.captioning_features(caption_fields=("tokens",)),
            homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # `_manual_dir`, not the `manual_dir` property: a missing directory is our own named error.
        by_split = read_images(dl_manager._manual_dir, self.builder_config.sources)
        return {split: self._generate_examples(images) for split, images in by_split.items()}

    def _generate_examples(self, images: list[_Image]) -> Iterator[tuple[str, dict]]:
        dataset = f"{NAME}/{self.builder_config.name}"
        for image in images:
            yield str(image.image_id), {
                "image": layout.read_image_bytes(image.path, dataset, f"{image.split} split"),
                "image/id": image.image_id,
                "image/filename": image.filename,
                "captions": list(image.captions),
            }
