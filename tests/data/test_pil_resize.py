"""`config.input.resize="pil_bicubic"`: the input pipeline's images equal PIL's bicubic resize, the LaDiC
release's preprocessing (torchvision's `Resize` / `RandomResizedCrop` on PIL images: crop the PIL image to the
box, then `Image.resize((size, size), Image.BICUBIC)`), followed by the same normalisation.

The reference is computed here from the stored file bytes with PIL alone (`Image.open(...).convert("RGB")`,
`crop`, `resize`, numpy normalisation), on a tiny dataset of noise images of several sizes and aspect ratios:
downscaled, upscaled, already at the target size, grayscale PNG and JPEG, and one smooth image.
"""

from __future__ import annotations

import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ladic_jax import config as config_lib
from ladic_jax.data import layout
from ladic_jax.data import pipeline

SIZE = 24
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as the release normalises
STD = (0.26862954, 0.26130258, 0.27577711)
TOL = 1e-6
# (height, width, PIL mode, format, content) of the images; the same images in both splits.
IMAGES = [
    (48, 64, "RGB", "PNG", "noise"),     # downscaled, landscape
    (70, 30, "RGB", "PNG", "noise"),     # downscaled, portrait
    (9, 13, "RGB", "PNG", "noise"),      # smaller than the target: upscaled
    (40, 33, "L", "PNG", "noise"),       # grayscale
    (SIZE, SIZE, "RGB", "PNG", "noise"),  # already at the target size: no resampling
    (31, 50, "L", "JPEG", "noise"),      # grayscale JPEG
    (100, 57, "RGB", "PNG", "smooth"),
    (20, 90, "RGB", "JPEG", "noise"),    # upscaled in height, downscaled in width
]
TRAIN_BASE, TEST_BASE = 100, 200


def encoded(k: int) -> bytes:
    h, w, mode, fmt, content = IMAGES[k]
    rng = np.random.default_rng(k)
    if content == "noise":
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 5.0 + y / 7.0)], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


class LadicResizeTestCaptions(tfds.core.GeneratorBasedBuilder):
    """`coco_captions` features; `image` holds each file's bytes as written (decoded by the pipeline)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=layout.captioning_features())

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(TRAIN_BASE), "test": self._generate_examples(TEST_BASE)}

    def _generate_examples(self, base):
        for k in range(len(IMAGES)):
            yield f"{k:03d}", {"image": encoded(k), "image/id": base + k, "image/filename": f"{k}.img",
                               "captions": {"id": [10 * (base + k)], "text": [f"a picture number {k}"]}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    LadicResizeTestCaptions(data_dir=d).download_and_prepare()
    return d


def make_cfg(data_dir, **overrides):
    fields = dict(dataset="ladic_resize_test_captions", data_dir=data_dir, image_size=SIZE, image_mean=MEAN,
                  image_std=STD, tokenizer="minilm", shuffle_buffer=len(IMAGES), batch_size=4, eval_batch_size=3,
                  seed=5, resize="pil_bicubic")
    fields.update(overrides)
    return config_lib.input_config(**fields)


# ----------------------------------------------------------------------------- the independent reference


def pil_image(image_id: int) -> Image.Image:
    """The stored file decoded as the release does: `Image.open(path).convert("RGB")`."""
    return Image.open(io.BytesIO(encoded(image_id % 100))).convert("RGB")


def reference(im: Image.Image, box=None) -> np.ndarray:
    """torchvision on a PIL image: crop to `box` (left, upper, right, lower), `resize((SIZE, SIZE), BICUBIC)`
    (PIL copies an image already at that size), ToTensor (/ 255), Normalize."""
    if box is not None:
        im = im.crop(box)
    x = np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC), np.float32) / np.float32(255.0)
    return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def crop_box(seed: int, epoch: int, image_id: int, shape, scale) -> tuple[int, int, int, int]:
    """The training stream's crop box of an example, drawn as the module docstring states: the crop key is
    folded from (seed, example stream, epoch, image/id, crop sub-stream) and the box drawn by
    `tf.image.stateless_sample_distorted_bounding_box`. Returned as PIL's (left, upper, right, lower)."""
    def fold(key, data):
        return tf.random.experimental.stateless_fold_in(key, tf.constant(data, tf.int64))

    key = fold(fold(fold(tf.constant([seed, pipeline._EXAMPLE_STREAM], tf.int64), epoch), image_id),
               pipeline._CROP_KEY)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.constant([shape[0], shape[1], 3], tf.int32), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=key, min_object_covered=float(scale[0]), aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(float(scale[0]), float(scale[1])), max_attempts=10, use_image_if_no_bounding_boxes=True)
    (top, left, _), (h, w, _) = begin.numpy().tolist(), size.numpy().tolist()
    return left, top, left + w, top + h


def eval_images(cfg) -> dict[int, np.ndarray]:
    out = {}
    for batch in pipeline.make_eval_iterator(cfg, process_index=0, process_count=1):
        for k in np.flatnonzero(batch["_mask"]):
            out[int(batch["image_id"][k])] = batch["image"][k]
    return out


def report(what: str, diffs: dict[int, float]) -> float:
    worst = max(diffs.values())
    print(f"\n{what}: max |pipeline - PIL| = {worst:.3g} over {len(diffs)} images; by image id: "
          + ", ".join(f"{i}: {d:.3g}" for i, d in sorted(diffs.items())))
    return worst


# ----------------------------------------------------------------------------- tests


def test_eval_stream_equals_pil_bicubic(data_dir):
    images = eval_images(make_cfg(data_dir))
    assert sorted(images) == [TEST_BASE + k for k in range(len(IMAGES))]
    diffs = {}
    for image_id, got in images.items():
        assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.float32
        diffs[image_id] = float(np.abs(got - reference(pil_image(image_id))).max())
    assert report("eval, pil_bicubic", diffs) <= TOL


@pytest.mark.parametrize("crop", [False, True])
def test_train_stream_equals_pil_bicubic(data_dir, crop):
    scale = (0.3, 0.7)
    cfg = make_cfg(data_dir, random_resized_crop=crop, crop_scale=scale)
    per_epoch = len(IMAGES) // cfg.batch_size
    stream = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    diffs, cropped, seen = {}, 0, set()
    for b in range(2 * per_epoch):  # two epochs: every image twice, with two crop boxes
        batch = next(stream)
        epoch = b // per_epoch
        for got, image_id in zip(batch["image"], batch["image_id"].tolist()):
            seen.add((epoch, image_id))
            im = pil_image(image_id)
            box = crop_box(cfg.seed, epoch, image_id, (im.height, im.width), scale) if crop else None
            want = reference(im, box)
            diffs[(epoch, image_id)] = float(np.abs(got - want).max())
            if box is not None and box != (0, 0, im.width, im.height):
                cropped += 1
                # The box matters: the same image resized whole is far from what the pipeline gave.
                assert np.abs(got - reference(im)).max() > 0.05
    assert seen == {(e, TRAIN_BASE + k) for e in range(2) for k in range(len(IMAGES))}
    if crop:
        assert cropped >= len(IMAGES)  # Most boxes are proper crops, so the box reproduction is tested.
    worst = report(f"train, pil_bicubic, random_resized_crop={crop}", {i: d for (_, i), d in diffs.items()})
    assert worst <= TOL, {k: d for k, d in diffs.items() if d > TOL}


def test_tf_bicubic_differs_from_pil_and_is_the_default(data_dir):
    tf_images = eval_images(make_cfg(data_dir, resize="tf_bicubic"))
    diffs = {i: float(np.abs(x - reference(pil_image(i))).max()) for i, x in tf_images.items()}
    report("eval, tf_bicubic", diffs)
    resized = [TEST_BASE + k for k, (h, w, *_) in enumerate(IMAGES) if (h, w) != (SIZE, SIZE)]
    # Every resampled image differs by far more than float error (TensorFlow's result is not even rounded to
    # grey levels); the upscaled noise image by many grey levels (~12, with this std).
    assert all(diffs[i] > 1e-3 for i in resized)
    assert diffs[TEST_BASE + IMAGES.index((9, 13, "RGB", "PNG", "noise"))] > 0.1
    assert diffs[TEST_BASE + IMAGES.index((SIZE, SIZE, "RGB", "PNG", "noise"))] <= TOL  # not resampled
    old = make_cfg(data_dir)
    del old["resize"]  # A config without the field (saved before it existed, or not from input_config).
    for image_id, x in eval_images(old).items():
        np.testing.assert_array_equal(x, tf_images[image_id])


def test_resize_field_validated_and_overridable(data_dir):
    bad = make_cfg(data_dir, resize="bilinear")
    pattern = r"config\.input\.resize must be one of \['tf_bicubic', 'pil_bicubic'\].*got 'bilinear'"
    with pytest.raises(config_lib.ConfigError, match=pattern):
        config_lib.validate_input(bad, process_count=1)
    with pytest.raises(config_lib.ConfigError, match=pattern):
        pipeline.make_eval_iterator(bad, process_index=0, process_count=1)
    with pytest.raises(config_lib.ConfigError, match=pattern):
        pipeline.make_train_iterator(bad, process_index=0, process_count=1)
    config = ml_collections.ConfigDict({"input": config_lib.input_config(tokenizer="t")})
    assert config.input.resize == "tf_bicubic"
    config_lib.apply_overrides(config, ["--config.input.resize=pil_bicubic"])
    assert config_lib.validate_input(config.input, process_count=1).resize == "pil_bicubic"
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.resize"):
        config_lib.validate(config_lib.apply_overrides(config, ["--config.input.resize=nearest"]))
