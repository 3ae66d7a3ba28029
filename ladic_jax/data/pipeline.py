"""Input pipeline: any TFDS captioning builder -> numpy batches for training and evaluation.

Reads datasets whose features follow `coco_captions` (`image`, `image/id`, and `captions` with a
`text` sequence), e.g. `shapes_captions/default` (this project's synthetic set) and
`coco_captions/2014` (Karpathy splits `train`, `restval`, `val`, `test`; train on
`"train+restval"`). Every process reads its own slice, `tfds.even_splits(split, process_count)
[process_index]`, and yields its local share of each global batch.

Training stream (`make_train_iterator`)
  Epoch `e` of a process visits its slice in an order shuffled (with a buffer of
  `shuffle_buffer` records) by a seed derived from `(seed, e, process_index)`, and for every image
  draws ONE of its captions with a stateless random choice keyed by `(seed, e, image/id)`; crop and
  flip are drawn from the same key. Epochs follow each other forever and batches run across epoch
  boundaries. So the stream is a pure function of `(config, process_index, process_count)`, and
  batch `k` starts at example `k * local_batch` of it: `start_step=k` jumps to that epoch directly
  and skips the remaining records *before* image decoding (images are read as encoded bytes and
  decoded after the skip), which makes resuming cheap and exact.

  Images: decoded to RGB, then either resized to `image_size` x `image_size` (bicubic, aspect not
  kept, by the method `resize` names below; no resampling when the image already has that size)
  or, with `random_resized_crop`, a random crop of `crop_scale` of the area and aspect ratio in
  [3/4, 4/3] (drawn uniformly, as `tf.image.sample_distorted_bounding_box` does; torchvision draws
  it log-uniformly) cut from the uint8 image and resized likewise. Pixels are scaled to [0, 1] and
  normalised with `image_mean` and `image_std`.

  `resize` (`config.input.resize`, optional; every resize of both streams):
    "tf_bicubic"  (the default, also when the field is absent) `tf.image.resize(..., "bicubic",
                  antialias=True)` on the float image, not rounded. It differs from PIL's bicubic
                  by about a grey level on smooth images and by up to ~24 grey levels (0.18 in
                  normalised units with std 0.5) on noise, near the borders, when upscaling or
                  shrinking little (mean ~0.003 either way, at 224 px).
    "pil_bicubic" `PIL.Image.resize((size, size), Image.BICUBIC)` on the uint8 RGB image (in a
                  `tf.numpy_function`; `image_files.resize_bicubic`, the call `ladic-caption`
                  makes): the resize torchvision's `Resize` / `RandomResizedCrop` make on PIL
                  images (the LaDiC release's preprocessing) exactly, rounded to uint8 as there;
                  the crop box is still drawn as above. PIL runs on the host, in parallel calls
                  (it releases the GIL while resampling).

  Flip: with `flip`, half of the training images are mirrored left-right and the sampled caption
  has the words "left"/"right" (and "leftmost"/"rightmost") swapped so that it stays true of the
  picture. Keep `flip` off for `shapes_captions`, whose captions are mostly about relative
  positions; for COCO the word swap is usually right and rarely matters.

  Captions are normalised (`text.normalize_caption`) and tokenized on the host, per batch, with
  the fast tokenizer (padded to `max_length`, truncated, [CLS]/[SEP] included). The caption drawn
  is one of those kept by the bad-record rules; its random draw is keyed as above.

Evaluation stream (`make_eval_iterator`)
  Every example of the split exactly once, in the stored order; the last batch is padded and
  `_mask` marks real examples; every process yields the same number of batches (fully masked ones
  where it has fewer examples), so a multi-host evaluation never hangs on a collective.

Bad records
  Images are decoded by PIL (`bad_records.decode_image`, in a `tf.numpy_function`) and captions
  checked on the host (`bad_records.check_captions`): corrupt, truncated or huge images and
  records without a usable caption are skipped, other modes converted to RGB, by the rules
  stated in `ladic_jax.data.bad_records`. A skipped record never stops the stream: in training
  its slot in the batch takes a copy of a kept record, in evaluation it is a masked row that
  keeps its id. `TrainStream.pop_counts()` and each evaluation batch's `_data_flags` tell what
  was done. PIL costs about 1 ms more host CPU per image than TensorFlow's own decoders (measured
  on 64x64 PNGs), the price of one decoder that never raises: TensorFlow's raise inside tf.data on
  corrupt data, which would end the stream.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ladic_jax import config as config_lib
from ladic_jax.data import bad_records
from ladic_jax.data import datasets
from ladic_jax.data import image_files
from ladic_jax.data import text
from ladic_jax.data.bad_records import SKIP_MASK

__all__ = [
    "get_builder",
    "TrainStream",
    "make_train_iterator",
    "make_eval_iterator",
    "num_eval_examples",
    "process_split",
]

# Crop aspect-ratio range of the random resized crop (as in Inception / torchvision).
_CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
# Independent random streams derived from the config seed.
_SHUFFLE_STREAM, _EXAMPLE_STREAM = 1, 2
# Per-example sub-streams.
_CAPTION_KEY, _CROP_KEY, _FLIP_KEY = 0, 1, 2

Batch = dict[str, Any]

log = logging.getLogger(__name__)

# Skipped training records named in the log, per stream; later ones are only counted.
_LOGGED_SKIPS = 20


# --------------------------------------------------------------------------- dataset access


def _keep_tf_off_accelerators() -> None:
    """Hides GPUs from TensorFlow so tf.data never takes accelerator memory from JAX."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing left to do.
        pass


def get_builder(input_cfg) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder named by `input_cfg.dataset` in `input_cfg.data_dir`.

    Project datasets (`ladic_jax.data.datasets`) are registered on demand. The dataset must have been
    prepared (`ladic-data build ...`, or `tfds build coco_captions` for TFDS's COCO).
    """
    _keep_tf_off_accelerators()
    name = input_cfg.dataset
    datasets.register(name)
    try:
        builder = tfds.builder(name, data_dir=input_cfg.data_dir)
    except Exception as e:  # TFDS raises several types for an unknown name.
        raise ValueError(f"config.input.dataset={name!r} is not a known TFDS dataset: {e}") from e
    if not builder.info.splits:
        raise ValueError(
            f"config.input.dataset={name!r} is not prepared in data_dir={input_cfg.data_dir!r} "
            f"(looked in {builder.data_dir}); build it first: {datasets.build_hint(name)}")
    return builder


def _num_examples(builder: tfds.core.DatasetBuilder, split, field: str) -> int:
    """Number of examples of a split spec (sub-splits and `a+b` included), naming `field` on error."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
            f"{field}={split!r} is not a valid split of {builder.info.full_name} "
            f"(splits: {sorted(builder.info.splits)}): {e}") from e


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in this process' index and the process count from JAX when not given."""
    if process_index is None or process_count is None:
        import jax  # Only needed for the defaults.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return process_index, process_count


def process_split(split: str, process_index: int, process_count: int):
    """The slice of `split` read by one process: `tfds.even_splits(split, n)[i]`."""
    return tfds.even_splits(split, process_count)[process_index]


def _head_split(builder: tfds.core.DatasetBuilder, split: str, limit: int, field: str) -> str:
    """The first `limit` examples of `split` (in stored order) as an absolute split spec."""
    _num_examples(builder, split, field)  # Validates the spec with a clear message.
    parts = []
    remaining = limit
    for inst in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
        if remaining <= 0:
            break
        start = inst.from_ or 0
        stop = builder.info.splits[inst.splitname].num_examples if inst.to is None else inst.to
        take = min(stop - start, remaining)
        if take > 0:
            parts.append(f"{inst.splitname}[{start}:{start + take}]")
            remaining -= take
    if not parts:
        raise ValueError(f"{field}={split!r} limited to {limit} examples is empty")
    return "+".join(parts)


def _decoders() -> tfds.decode.PartialDecoding:
    """Reads only what the pipeline uses, with the image left encoded (decoded later by us)."""
    return tfds.decode.PartialDecoding(
        {"image": True, "image/id": True, "captions": {"text": True}},
        decoders={"image": tfds.decode.SkipDecoding()},
    )


def _read(builder: tfds.core.DatasetBuilder, split) -> tf.data.Dataset:
    """The split's records in stored order, image still encoded."""
    return builder.as_dataset(split=split, shuffle_files=False, decoders=_decoders())


# --------------------------------------------------------------------------- image ops


def _resize_method(cfg) -> str:
    """`config.input.resize` (validated by `config.validate_input`); the default when absent."""
    return cfg.get("resize", config_lib.RESIZE_METHODS[0])


def _resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """uint8 (h, w, 3) -> float32 (size, size, 3) in [0, 255] by `method` (see the module docstring)."""
    if method == "pil_bicubic":
        return _pil_resize(image, size)
    if method != "tf_bicubic":
        raise ValueError(f"config.input.resize must be one of {list(config_lib.RESIZE_METHODS)}, got {method!r}")
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    resized = tf.cond(
        same,
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, [size, size], method="bicubic", antialias=True),
    )
    return tf.clip_by_value(tf.ensure_shape(resized, [size, size, 3]), 0.0, 255.0)


def _pil_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """`_resize` by PIL's bicubic resize of the uint8 image (`image_files.resize_bicubic`)."""

    @tf.autograph.experimental.do_not_convert
    def resize(rgb):
        return image_files.resize_bicubic(np.ascontiguousarray(rgb), size)

    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    resized = tf.cond(same, lambda: image,  # (as PIL would: a copy) without a call to Python
                      lambda: tf.numpy_function(resize, [image], tf.uint8, stateful=False))
    return tf.cast(tf.ensure_shape(resized, [size, size, 3]), tf.float32)


def _random_resized_crop(image: tf.Tensor, size: int, scale, seed: tf.Tensor, method: str) -> tf.Tensor:
    """A crop of `scale` of the area, aspect in [3/4, 4/3], resized to (size, size)."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=float(scale[0]),
        aspect_ratio_range=_CROP_ASPECT,
        area_range=(float(scale[0]), float(scale[1])),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return _resize(tf.slice(image, begin, crop_size), size, method)


def _normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
    """[0, 255] -> [0, 1] -> (x - mean) / std, per channel."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image / 255.0 - mean) / std


def _fold(key: tf.Tensor, data) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _decode(encoded: tf.Tensor, cfg) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image -> (uint8 (h, w, 3), int32 flags) by `bad_records.decode_image`."""
    max_pixels = int(cfg.get("max_image_pixels", config_lib.DEFAULT_MAX_IMAGE_PIXELS))

    @tf.autograph.experimental.do_not_convert
    def decode(data):
        if isinstance(data, np.ndarray):  # Eager mode passes a 0-d object array, graph mode bytes.
            data = data.item()
        image, flags = bad_records.decode_image(data, max_pixels)
        return image, np.int32(flags)

    image, flags = tf.numpy_function(decode, [encoded], [tf.uint8, tf.int32], stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(flags, [])


def _caption_lists(captions) -> list[list[bytes]]:
    """A batch's captions, ragged (dense (B, 0) when an evaluation batch is only padding)."""
    return captions.to_list() if isinstance(captions, tf.RaggedTensor) else captions.numpy().tolist()


def _log_skip(stream: str, image_id: int, flags: int) -> None:
    log.warning("%s: record image/id=%d skipped (%s)", stream, image_id, bad_records.skip_reason(flags))


# --------------------------------------------------------------------------- training


def _local_batch_size(global_batch: int, process_count: int, field: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise config_lib.ConfigError(
            f"{field} must be a positive integer divisible by the number of processes "
            f"({process_count}), got {global_batch}")
    return global_batch // process_count


def _train_dataset(cfg, builder, split, num_local: int, local_batch: int, start_step: int,
                   process_index: int) -> tf.data.Dataset:
    """The tf.data part of the training stream (see the module docstring)."""
    records = _read(builder, split)
    seed = int(cfg.seed)
    buffer = min(int(cfg.shuffle_buffer), num_local)

    def epoch(e):
        ds = records
        if buffer > 1:
            key = _fold(_fold(tf.constant([seed, _SHUFFLE_STREAM], tf.int64), e), process_index)
            shuffle_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
            ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda ex: {**ex, "epoch": e})

    position = start_step * local_batch
    ds = tf.data.Dataset.counter(position // num_local).flat_map(epoch)
    ds = ds.skip(position % num_local)  # Still encoded: skipping costs no decoding.

    size, scale = int(cfg.image_size), tuple(cfg.crop_scale)
    crop, flip = bool(cfg.random_resized_crop), bool(cfg.flip)
    method = _resize_method(cfg)

    def preprocess(ex):
        image_id = ex["image/id"]
        key = _fold(_fold(tf.constant([seed, _EXAMPLE_STREAM], tf.int64), ex["epoch"]), image_id)
        image, flags = _decode(ex["image"], cfg)  # A 1x1 dummy when skipped: processed, not used.
        if crop:
            image = _random_resized_crop(image, size, scale, _fold(key, _CROP_KEY), method)
        else:
            image = _resize(image, size, method)
        flipped = tf.constant(False)
        if flip:
            flipped = tf.random.stateless_uniform([], _fold(key, _FLIP_KEY)) < 0.5
            image = tf.cond(flipped, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return {
            "image": _normalize(image, cfg.image_mean, cfg.image_std),
            "image_id": image_id,
            "captions": ex["captions"]["text"],
            # The host takes kept caption int(u * n) of n (the bad-record rules need Python).
            "caption_u": tf.random.stateless_uniform([], _fold(key, _CAPTION_KEY)),
            "flipped": flipped,
            "flags": flags,
        }

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ragged_batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_train_iterator(input_cfg, tokenizer=None, *, start_step: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None) -> "TrainStream":
    """Endless training batches for this process, starting at batch `start_step` of the stream.

    Args:
      input_cfg: the `config.input` section (validated here).
      tokenizer: a fast HF tokenizer; loaded from `input_cfg.tokenizer` when None.
      start_step: index of the first batch to yield; the stream from `start_step=k` equals the
        uninterrupted stream from its batch `k` on.
      process_index, process_count: this process' slot; default to JAX's.

    Returns:
      A `TrainStream`: an iterator of local batches (`input_cfg.batch_size // process_count`
      examples): `image` float32 (B, H, W, 3) normalised; `tokens` int32 (B, L) and `token_mask`
      int32 (B, L) of the one caption sampled for each image this epoch; `image_id` int64 (B,).
      Its `pop_counts()` tells what the bad-record rules did.
    """
    process_index, process_count = _process_slot(process_index, process_count)
    config_lib.validate_input(input_cfg, process_count=process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    local_batch = _local_batch_size(input_cfg.batch_size, process_count, "config.input.batch_size")
    if tokenizer is None:
        tokenizer = text.load_tokenizer(input_cfg.tokenizer)
    builder = get_builder(input_cfg)
    _num_examples(builder, input_cfg.train_split, "config.input.train_split")  # Clear error first.
    split = process_split(input_cfg.train_split, process_index, process_count)
    num_local = builder.info.splits[split].num_examples
    if num_local == 0:
        raise ValueError(f"config.input.train_split={input_cfg.train_split!r} gives process "
                         f"{process_index} of {process_count} no examples")
    ds = _train_dataset(input_cfg, builder, split, num_local, local_batch, int(start_step),
                        process_index)
    where = f"training split {input_cfg.train_split!r} (process {process_index} of {process_count})"
    # Every record of the slice is met within two slices' worth of consecutive records.
    override = read_caption_file(input_cfg.get("train_caption_file") or None)
    return TrainStream(ds, tokenizer, int(input_cfg.max_length), choice=input_cfg.train_captions,
                       override=override, max_bad_batches=2 * num_local // local_batch + 2, where=where)


def read_caption_file(path: str | None) -> dict[int, str]:
    """`config.input.train_caption_file`: JSON lines of {"image_id", "caption"} (e.g. an evaluator's
    `eval/step_<N>_captions.jsonl` over the training split), normalised; {} without a path."""
    if not path:
        return {}
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"config.input.train_caption_file={path!r} does not exist")
    out = {}
    with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                out[int(record["image_id"])] = text.normalize_caption(str(record["caption"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"config.input.train_caption_file={path!r}, line {number}: expected a JSON "
                                 f"object with an integer image_id and a caption ({type(e).__name__}: {e})") from None
    if not out:
        raise ValueError(f"config.input.train_caption_file={path!r} holds no captions")
    return out


class TrainStream:
    """The training batches of `make_train_iterator`, and counts of what the bad-record rules did."""

    def __init__(self, ds: tf.data.Dataset, tokenizer, max_length: int, *, choice: str,
                 max_bad_batches: int, where: str, override: dict[int, str] | None = None):
        self._batches = iter(ds)
        self._ahead: collections.deque = collections.deque()  # Checked batches read ahead.
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._choice = choice
        self._override = override or {}
        self._max_bad_batches = max_bad_batches
        self._where = where
        self._counts = bad_records.Counts()
        self._logged = 0

    def __iter__(self) -> "TrainStream":
        return self

    def _checked(self, ahead: int) -> dict[str, Any]:
        """Batch `ahead` after the next one, with each row's kept captions and its full flags."""
        while len(self._ahead) <= ahead:
            b = next(self._batches)
            checked = [bad_records.check_captions(c) for c in _caption_lists(b["captions"])]
            self._ahead.append({
                "image": b["image"].numpy(), "image_id": b["image_id"].numpy().astype(np.int64),
                "flipped": b["flipped"].numpy(), "caption_u": b["caption_u"].numpy(),
                "captions": [kept for kept, _ in checked],
                "flags": b["flags"].numpy().astype(np.int64) | [f for _, f in checked]})
        return self._ahead[ahead]

    def __next__(self) -> Batch:
        b = self._checked(0)
        self._ahead.popleft()
        flags = b["flags"]
        self._counts.add(flags)
        for i in np.flatnonzero(flags & SKIP_MASK):
            if self._logged < _LOGGED_SKIPS:
                _log_skip(self._where, int(b["image_id"][i]), int(flags[i]))
            elif self._logged == _LOGGED_SKIPS:
                log.warning("%s: further skipped records are counted, not logged", self._where)
            self._logged += 1
        src = b if not (flags & SKIP_MASK).all() else self._next_with_a_kept_record()
        kept = np.flatnonzero((src["flags"] & SKIP_MASK) == 0)
        rows = kept[np.arange(flags.shape[0]) % kept.size]  # The identity when nothing is skipped.
        captions = []
        for i in rows:
            choices = src["captions"][i]
            image_id = int(src["image_id"][i])
            if image_id in self._override:
                caption = self._override[image_id]
            elif self._choice == "first":
                caption = choices[0]
            elif self._choice == "shortest":  # fewest words; the first of those
                caption = min(choices, key=lambda c: len(c.split()))
            else:
                caption = choices[int(float(src["caption_u"][i]) * len(choices))]
            captions.append(text.swap_left_right(caption) if src["flipped"][i] else caption)
        tokens, mask = text.tokenize(self._tokenizer, captions, self._max_length)
        return {"image": src["image"][rows], "tokens": tokens, "token_mask": mask,
                "image_id": src["image_id"][rows]}

    def _next_with_a_kept_record(self) -> dict[str, Any]:
        """The next batch with a kept record (read ahead; it is still yielded in its turn)."""
        for ahead in range(self._max_bad_batches):
            b = self._checked(ahead)
            if not (b["flags"] & SKIP_MASK).all():
                return b
        raise ValueError(f"{self._where}: no usable record in {self._max_bad_batches} consecutive "
                         f"batches (the whole slice, twice): see the skip reasons logged above")

    def pop_counts(self) -> dict[str, int]:
        """`bad_records.Counts` of the batches yielded since the previous call.

        With several JAX processes the counts are summed over them: every process must then call
        this at the same step (it is a collective).
        """
        counts, self._counts = self._counts.as_dict(), bad_records.Counts()
        from ladic_jax import sharding  # (imports JAX, which the rest of the pipeline does without)

        total = sharding.over_processes(np.array(list(counts.values()), np.int64), np.sum)
        return dict(zip(counts, total.tolist()))


# --------------------------------------------------------------------------- evaluation


def _eval_split(builder, input_cfg, split: str | None, limit: int | None) -> str:
    split = input_cfg.eval_split if split is None else split
    field = "config.input.eval_split" if split == input_cfg.eval_split else "split"
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of examples, got {limit}")
        split = _head_split(builder, split, int(limit), field)
    _num_examples(builder, split, field)
    return split


def num_eval_examples(input_cfg, split: str | None = None, limit: int | None = None) -> int:
    """Number of examples `make_eval_iterator` reads (over all processes) for this split; the bad
    records it skips are among them."""
    builder = get_builder(input_cfg)
    split = _eval_split(builder, input_cfg, split, limit)
    return builder.info.splits[split].num_examples


def make_eval_iterator(input_cfg, tokenizer=None, *, split: str | None = None,
                       batch_size: int | None = None, process_index: int | None = None,
                       process_count: int | None = None,
                       limit: int | None = None) -> Iterator[Batch]:
    """Every example of `split` once, in stored order, in padded batches for this process.

    Args:
      input_cfg: the `config.input` section (validated here).
      tokenizer: a fast HF tokenizer; loaded from `input_cfg.tokenizer` when None.
      split: TFDS split spec; `input_cfg.eval_split` when None.
      batch_size: global batch size; `input_cfg.eval_batch_size` when None.
      process_index, process_count: this process' slot; default to JAX's.
      limit: score only the first `limit` examples of the split (before per-process slicing).

    Yields:
      Local batches of `batch_size // process_count` rows: `image` float32 (B, H, W, 3),
      `image_id` int64 (B,) (-1 on padding), `_mask` bool (B,) (False on padding and on skipped
      bad records, which keep their id), `_data_flags` int32 (B,) (`bad_records` flags; 0 on
      padding), `references` (list of B lists of normalised caption strings, the kept ones; empty
      on padding and skipped records), and `tokens`/`token_mask` int32 (B, L) of each example's
      first reference. All processes yield the same number of batches.
    """
    process_index, process_count = _process_slot(process_index, process_count)
    config_lib.validate_input(input_cfg, process_count=process_count)
    if batch_size is None:
        local_batch = _local_batch_size(input_cfg.eval_batch_size, process_count,
                                        "config.input.eval_batch_size")
    else:
        local_batch = _local_batch_size(batch_size, process_count, "batch_size")
    if tokenizer is None:
        tokenizer = text.load_tokenizer(input_cfg.tokenizer)
    builder = get_builder(input_cfg)
    split = _eval_split(builder, input_cfg, split, limit)
    subsplits = tfds.even_splits(split, process_count)
    counts = [builder.info.splits[s].num_examples for s in subsplits]
    if sum(counts) == 0:
        raise ValueError(f"evaluation split {split!r} of {builder.info.full_name} is empty")
    num_batches = max(math.ceil(c / local_batch) for c in counts)
    ds = _eval_dataset(input_cfg, builder, subsplits[process_index], counts[process_index],
                       local_batch, num_batches)
    return _eval_batches(ds, tokenizer, int(input_cfg.max_length))


def _eval_dataset(cfg, builder, split, count: int, local_batch: int,
                  num_batches: int) -> tf.data.Dataset:
    size = int(cfg.image_size)
    method = _resize_method(cfg)

    def preprocess(ex):
        image, flags = _decode(ex["image"], cfg)  # A 1x1 dummy when skipped: processed, not used.
        return {
            "image": _normalize(_resize(image, size, method), cfg.image_mean, cfg.image_std),
            "image_id": ex["image/id"],
            "captions": ex["captions"]["text"],
            "_mask": tf.constant(True),
            "flags": flags,
        }

    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros([size, size, 3], tf.float32),
        "image_id": tf.constant(-1, tf.int64),
        "captions": tf.zeros([0], tf.string),
        "_mask": tf.constant(False),
        "flags": tf.constant(0, tf.int32),
    }).repeat(num_batches * local_batch - count)
    if count:
        ds = _read(builder, split).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)
        ds = ds.concatenate(padding)
    else:  # This process has no examples: only padding, to keep step with the others.
        ds = padding
    options = tf.data.Options()
    options.deterministic = True
    return ds.ragged_batch(local_batch).with_options(options).prefetch(tf.data.AUTOTUNE)


def _eval_batches(ds: tf.data.Dataset, tokenizer, max_length: int) -> Iterator[Batch]:
    for batch in ds:
        captions = _caption_lists(batch["captions"])
        ids = batch["image_id"].numpy().astype(np.int64)
        mask = batch["_mask"].numpy().astype(bool)
        flags = batch["flags"].numpy().astype(np.int32)
        references = []
        for i, caps in enumerate(captions):
            kept = []
            if mask[i]:
                kept, caption_flags = bad_records.check_captions(caps)
                flags[i] |= caption_flags
                if flags[i] & SKIP_MASK:
                    mask[i], kept = False, []
            references.append(kept)
        tokens, token_mask = text.tokenize(tokenizer, [r[0] if r else "" for r in references], max_length)
        yield {
            "image": batch["image"].numpy(),
            "image_id": ids,
            "_mask": mask,
            "_data_flags": flags,
            "references": references,
            "tokens": tokens,
            "token_mask": token_mask,
        }
