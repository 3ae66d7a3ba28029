"""`cub_captions`: CUB-200-2011 birds with Reed et al.'s ten captions per image, built from local files (TFDS).

Importing this module registers the builder. It reads, from a manual directory (local or `gs://`):

  CUB_200_2011/          the dataset as its archive unpacks (also accepted: its files directly in MANUAL)
    images.txt           "<image id> <class folder>/<file>.jpg" per line
    train_test_split.txt "<image id> <1 = train, 0 = test>" per line (config `default`)
    images/<class folder>/<file>.jpg
  text_c10/<class folder>/<file stem>.txt   ten captions, one per line (Reed et al., CVPR 2016,
                         "cvpr2016_cub"; also found under cvpr2016_cub/ or inside CUB_200_2011/)
  trainvalclasses.txt, testclasses.txt      class folders, one per line (config `unseen_classes` only;
                         from the same release, in MANUAL or cvpr2016_cub/)

and writes TFRecords with the features of `coco_captions` (plus `image/class`, the class folder):

    ladic-data build cub_captions --manual_dir /data/cub --data_dir ~/tensorflow_datasets

Configs:
  default          CUB's own image split (train_test_split.txt): train 5,994 / test 5,794 images.
  unseen_classes   Reed et al.'s class split (150 train+val classes / 50 test classes): train 8,855 /
                   test 2,933 images, the sizes MC-Diffusion reports ("over 8k training images and 3k test").

image/id is CUB's image id; captions are the file's lines in order, `id` = image id * 100 + line number (from 0). Images are
stored as the file's bytes, not decoded: one that cannot be decoded is skipped and counted by the input
pipeline's bad-record rules. A missing image or caption file stops the build naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from ladic_jax.data import layout

NAME = "cub_captions"
SPLITS = ("train", "test")

_INSTRUCTIONS = (
    "Unpack CUB_200_2011.tgz (Caltech-UCSD Birds-200-2011) into the manual directory, and Reed et al.'s "
    "captions (cvpr2016_cub: its text_c10/ folder, and for the class split trainvalclasses.txt and "
    "testclasses.txt) next to it. See the README, section 'Real datasets'.")


@dataclasses.dataclass(eq=False)
class CubConfig(tfds.core.BuilderConfig):
    """Which split of the images: CUB's own (`train_test_split.txt`) or Reed et al.'s class split."""

    class_split: bool = False


CONFIGS = (
    CubConfig(name="default", description="CUB's train_test_split.txt: 5,994 train / 5,794 test images."),
    CubConfig(name="unseen_classes", class_split=True,
              description="Reed et al.'s 150/50 class split: 8,855 train / 2,933 test images."),
)


@dataclasses.dataclass(frozen=True)
class _Image:
    image_id: int
    relpath: str  # "<class folder>/<file>.jpg"
    image: epath.Path
    captions: epath.Path


def read_images(manual_dir, class_split: bool) -> dict[str, list[_Image]]:
    """The images of each split in images.txt's order, every file they need located (not read)."""
    dataset = f"{NAME}/{'unseen_classes' if class_split else 'default'}"
    root = layout.manual_root(manual_dir, dataset, _INSTRUCTIONS)
    index = layout.find([root / "CUB_200_2011", root], ["images.txt"], dataset=dataset,
                        what="CUB_200_2011's image list")
    cub = index.parent
    image_dir = layout.find([cub], ["images"], dataset=dataset, what="CUB_200_2011's image folder",
                            directory=True)
    text_dir = layout.find([root, root / "cvpr2016_cub", cub], ["text_c10"], dataset=dataset,
                           what="Reed et al.'s captions, one <class>/<image>.txt per image", directory=True)
    images = [_Image(int(image_id), relpath, image_dir / relpath,
                     text_dir / (relpath.rsplit(".", 1)[0] + ".txt"))
              for image_id, relpath in _int_keyed(layout.read_table(index, 2, dataset), index, dataset)]
    if class_split:
        roots = [root, root / "cvpr2016_cub"]
        split_of_class = {}
        for split, filename in (("train", "trainvalclasses.txt"), ("test", "testclasses.txt")):
            path = layout.find(roots, [filename], dataset=dataset, what=f"the {split} classes of Reed et al.")
            split_of_class.update({name: split for name in layout.read_lines(path)})
        split_of = {im.image_id: split_of_class.get(im.relpath.split("/")[0]) for im in images}
        unassigned = sorted({im.relpath.split("/")[0] for im in images if split_of[im.image_id] is None})
        if unassigned:
            raise ValueError(f"{dataset}: {len(unassigned)} class folder(s) of {index} are in neither "
                             f"trainvalclasses.txt nor testclasses.txt, e.g. {unassigned[0]!r}")
    else:
        path = layout.find([cub], ["train_test_split.txt"], dataset=dataset, what="CUB's image split")
        flags = dict(_int_keyed(layout.read_table(path, 2, dataset), path, dataset))
        missing = [im.image_id for im in images if im.image_id not in flags]
        if missing:
            raise ValueError(f"{dataset}: {len(missing)} image id(s) of {index} have no line in {path}, "
                             f"e.g. {missing[0]}")
        split_of = {i: "train" if flag.strip() == "1" else "test" for i, flag in flags.items()}
    return {split: [im for im in images if split_of[im.image_id] == split] for split in SPLITS}


def _int_keyed(rows: list[list[str]], path: epath.Path, dataset: str) -> list[tuple[int, str]]:
    """Rows of "<integer id> <value>", checked."""
    out = []
    for image_id, value in rows:
        if not image_id.isdigit():
            raise ValueError(f"{dataset}: {path}: expected an integer image id at the start of "
                             f"{image_id + ' ' + value!r}")
        out.append((int(image_id), value))
    return out


class CubCaptions(tfds.core.GeneratorBasedBuilder):
    """CUB-200-2011 with ten captions per image, from files on disk or in a bucket."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=("Caltech-UCSD Birds-200-2011 images (Wah et al. 2011) with ten captions each "
                         "(Reed et al., CVPR 2016), read from local files."),
            features=layout.captioning_features(image_fields=("class",)),
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # `_manual_dir`, not the `manual_dir` property: a missing directory is our own named error.
        by_split = read_images(dl_manager._manual_dir, self.builder_config.class_split)
        return {split: self._generate_examples(images) for split, images in by_split.items()}

    def _generate_examples(self, images: list[_Image]) -> Iterator[tuple[str, dict]]:
        dataset = f"{NAME}/{self.builder_config.name}"
        for im in images:
            try:
                lines = layout.read_lines(im.captions)
            except FileNotFoundError:
                raise layout.LayoutError(f"{dataset}: missing caption file {im.captions} (ten captions of "
                                         f"image {im.image_id}, {im.relpath})") from None
            yield str(im.image_id), {
                "image": layout.read_image_bytes(im.image, dataset, f"image {im.image_id}"),
                "image/id": im.image_id,
                "image/filename": im.relpath,
                "image/class": im.relpath.split("/")[0],
                "captions": [{"id": im.image_id * 100 + k, "text": t} for k, t in enumerate(lines)],
            }
