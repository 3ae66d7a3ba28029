"""`shapes_captions`: the synthetic captioning dataset as a TFDS builder (DESIGN §3).

Importing this module registers the builder with TFDS, after which it is used like any other dataset:

    import ladic_jax.data.shapes_captions  # registers "shapes_captions"
    tfds.builder("shapes_captions/long", data_dir=DIR).download_and_prepare()
    ds = tfds.load("shapes_captions", split="test", data_dir=DIR)

Its features follow `coco_captions` (`image`, `image/id`, `image/filename`, `captions` with `id` and `text`)
so one input pipeline reads both; `objects` adds the ground truth of every shape. Nothing is downloaded:
the examples are drawn by `ladic_jax.data.shapes`, each from its own seed derived from (config seed,
split, index), so a rebuild gives the same PNG bytes and feature values in the same order (the record
files differ only in the order in which protobuf writes each example's feature map).

Configs: `default` (64 px, 1-3 objects, one-sentence captions), `long` (128 px, 4-6 objects, paragraph
captions of about 40-60 words) and `tiny` (the default scenes, a few dozen images, for smoke tests). Other
sizes or seeds: pass a `ShapesCaptionsConfig` with a new name as `config=`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from ladic_jax.data import shapes

# Image ids are `_ID_STRIDE * (split position + 1) + index`, unique across splits (and never 0).
_ID_STRIDE = 10_000_000
_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class ShapesCaptionsConfig(tfds.core.BuilderConfig):
    """A `shapes_captions` variant: how scenes are drawn, how many per split, and the base seed.

    Attributes:
      scene: canvas, object count and size classes (see `shapes.SceneSpec`).
      split_sizes: number of examples in each of "train", "validation" and "test".
      seed: base seed; split `k` example `i` is drawn from the seed sequence (seed, k, i).
      num_captions: reference captions per image.
    """

    scene: shapes.SceneSpec = shapes.SceneSpec()
    split_sizes: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 5000, "validation": 500, "test": 500})
    seed: int = 0
    num_captions: int = 5

    def __post_init__(self):
        if set(self.split_sizes) != set(_SPLITS) or any(n < 0 for n in self.split_sizes.values()):
            raise ValueError(f"ShapesCaptionsConfig({self.name!r}).split_sizes must give a non-negative "
                             f"size for exactly {_SPLITS}, got {dict(self.split_sizes)}")
        if any(n >= _ID_STRIDE for n in self.split_sizes.values()):
            raise ValueError(f"ShapesCaptionsConfig({self.name!r}).split_sizes: at most {_ID_STRIDE - 1} "
                             f"examples per split, got {dict(self.split_sizes)}")
        if not 1 <= self.num_captions <= 10:  # Caption ids are image_id * 10 + k.
            raise ValueError(f"ShapesCaptionsConfig({self.name!r}).num_captions must be in 1..10, "
                             f"got {self.num_captions}")


LONG_SCENE = shapes.SceneSpec(image_size=128, min_objects=4, max_objects=6, small_sides=(14, 18),
                              large_sides=(28, 34), gap=6, border=3)

CONFIGS = (
    ShapesCaptionsConfig(name="default", description="64x64, 1-3 shapes, one-sentence captions."),
    ShapesCaptionsConfig(name="long", scene=LONG_SCENE,
                         description="128x128, 4-6 shapes, paragraph captions (about 40-60 words)."),
    ShapesCaptionsConfig(name="tiny", split_sizes={"train": 48, "validation": 16, "test": 16},
                         description="The default scenes, 48/16/16 images: for smoke tests."),
)


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes on a plain background with five paraphrased reference captions each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.scene.image_size
        return self.dataset_info_from_configs(
            description=("Synthetic image captioning: coloured geometric shapes (circle, square, triangle, "
                         "diamond) in two sizes on a plain background, described by template captions that "
                         "name colours, sizes, shapes and relative positions. Generated, not downloaded."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "image/id": np.int64,
                "image/filename": tfds.features.Text(),
                "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.ClassLabel(names=shapes.SHAPES),
                    "color": tfds.features.ClassLabel(names=shapes.COLOR_NAMES),
                    "size": tfds.features.ClassLabel(names=shapes.SIZES),
                    "bbox": tfds.features.BBoxFeature(),
                }),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        config: ShapesCaptionsConfig = self.builder_config
        stream = _SPLITS.index(split)
        size = config.scene.image_size
        for index in range(config.split_sizes[split]):
            example = shapes.generate_example(config.scene, config.seed, stream, index, config.num_captions)
            image_id = _ID_STRIDE * (stream + 1) + index
            yield f"{split}_{index:07d}", {
                "image": example.image,
                "image/id": image_id,
                "image/filename": f"shapes_{split}_{index:07d}.png",
                "captions": [{"id": image_id * 10 + k, "text": text}
                             for k, text in enumerate(example.captions)],
                "objects": [{
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "bbox": tfds.features.BBox(ymin=o.y0 / size, xmin=o.x0 / size,
                                               ymax=o.y1 / size, xmax=o.x1 / size),
                } for o in example.objects],
            }
