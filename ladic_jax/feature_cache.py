"""Frozen-feature cache: a frozen encoder's output for every training image, computed once and read back.

When a family's image encoder is frozen (LaDiC with a pretrained tower, MC-Diffusion's VQ tokenizer) and the
training images are not augmented, the encoder gives the same output for an image in every epoch. With
``config.feature_cache.kind`` set, the trainer computes it once per training image before the first step (one
pass over the training stream, each image id once), keeps it on the host by image id, and puts it in every
training batch in place of the image (the family's ``feature_field``): the step no longer runs the encoder, and
the batch sent to the devices carries the features instead of the pixels.

  kind "off"     the encoder runs in every step (the default);
  kind "memory"  a host array of (training images, *feature shape): for small data (shapes: 10k x 65 x 128
                 float32 = 0.3 GiB);
  kind "disk"    the same array as a .npy file memory-mapped from ``config.feature_cache.dir`` (default
                 WORKDIR/feature_cache, a local path on each host): for data larger than host memory; it is
                 kept and reused when the run resumes (after checking its first batch against the encoder).

Built at the start of every run (fresh or resumed); not part of the checkpoints. Every process holds the
features of all training images (its batches may hold any of them). Evaluation runs the encoder as before.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax import sharding

KINDS = ("off", "memory", "disk")
_AUGMENTATIONS = ("flip", "random_resized_crop")


def default_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind="off", dir=""))


def kind(config) -> str:
    return config.get("feature_cache", {}).get("kind", "off")


@config_lib.register_validator("feature_cache")
def _validate(config) -> None:
    k = config_lib.require_choice(config, "feature_cache.kind", KINDS)
    if k == "off":
        return
    augmented = [f for f in _AUGMENTATIONS if config.input.get(f)]
    config_lib.check(not augmented, "config.feature_cache.kind",
                     f"= {k!r} needs the training images unaugmented: config.input.{augmented[0] if augmented else ''}"
                     " changes them from epoch to epoch (set it to false or the cache to 'off')")
    d = config.feature_cache.get("dir", "")
    config_lib.check(isinstance(d, str) and "://" not in d, "config.feature_cache.dir",
                     f"must be a local directory (it is memory-mapped), got {d!r}")


def check_frozen(family, frozen_mask) -> None:
    """Raises a ConfigError unless the family has a cacheable encoder and all of its parameters are frozen."""
    field, pattern = family.feature_field, family.feature_params
    config_lib.check(field is not None, "config.feature_cache.kind",
                     f"family {family.name!r} has no frozen encoder whose features can be cached: set it to 'off'")
    trained = [sharding.path_str(p) for p, f in jax.tree_util.tree_flatten_with_path(frozen_mask)[0]
               if re.search(pattern, sharding.path_str(p)) and not f]
    config_lib.check(not trained, "config.feature_cache.kind",
                     f"caches the output of the encoder {pattern!r}, but config.optim.frozen leaves "
                     f"{len(trained)} of its parameters trained (e.g. {trained[0] if trained else ''}): freeze it "
                     "or set the cache to 'off'")


class FeatureCache:
    """Features of a set of images by id (host side): ``attach`` puts them in a local batch."""

    def __init__(self, field: str, ids: np.ndarray, table: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.field, self._ids, self._rows, self.table = field, ids[order], order, table

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """The image ids held, ascending."""
        return self._ids

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64)
        pos = np.clip(np.searchsorted(self._ids, ids), 0, len(self._ids) - 1)
        missing = ids[self._ids[pos] != ids]
        if missing.size:
            raise ValueError(f"feature cache: image id {int(missing[0])} is not among the {len(self)} training "
                             "images it was built from (did the training data change? set "
                             "config.feature_cache.kind='off' or remove the cache directory)")
        return np.asarray(self.table[self._rows[pos]])

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with the features of its images in place of the images."""
        out = {k: v for k, v in batch.items() if k != "image"}
        out[self.field] = self.lookup(batch["image_id"])
        return out


def build(encode: Callable, params, batches: Iterator[dict[str, jax.Array]], size: int, max_batches: int,
          field: str, directory: str | None = None) -> tuple[FeatureCache, str]:
    """Reads global ``batches`` until ``size`` distinct image ids were seen (at most ``max_batches``), running
    the jitted ``encode(params, images)`` on each batch holding a new one. In ``directory`` (kind "disk"),
    the table is a memory-mapped .npy there, reused if complete and its first rows match the encoder.
    Returns the cache and a note for the log."""
    first = None
    if directory:
        found = _open(directory, field)
        if found is not None:
            batch = next(batches)
            ids = sharding.to_host(batch["image_id"]).astype(np.int64)
            fresh = sharding.to_host(encode(params, batch["image"]))
            try:
                same = np.allclose(found.lookup(ids), fresh, rtol=1e-4, atol=1e-5)
            except ValueError:
                same = False
            if same:
                return found, f"feature cache: {len(found)} training images' {field} read from {directory}"
            first = batch
    table, ids = None, np.zeros(size, np.int64)
    where: dict[int, int] = {}
    for i in range(max_batches):
        batch = first if first is not None else next(batches)
        first = None
        bid = sharding.to_host(batch["image_id"]).astype(np.int64)
        new = [j for j, k in enumerate(bid) if int(k) not in where]
        if new:
            feats = sharding.to_host(encode(params, batch["image"]))
            if table is None:
                table = _allocate(directory, field, (size,) + feats.shape[1:], feats.dtype)
            for j in new:
                k = int(bid[j])
                if k in where or len(where) >= size:
                    continue
                where[k] = len(where)
                table[where[k]] = feats[j]
                ids[where[k]] = k
        if len(where) >= size:
            break
    if len(where) < size:
        raise ValueError(f"config.feature_cache: {len(where)} of the {size} training images came through "
                         f"{max_batches} batches of the training stream (bad records skipped?)")
    if directory:
        table.flush()
        np.save(os.path.join(directory, "ids.npy"), ids)  # written last: marks the table complete
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump({"field": field, "shape": list(table.shape), "dtype": str(table.dtype)}, f)
    where_to = f" in {directory}" if directory else " in host memory"
    gib = table.size * table.dtype.itemsize / 2 ** 30
    return (FeatureCache(field, ids, table),
            f"feature cache: {size} training images' {field} {table.shape[1:]} computed once ({gib:.2f} GiB"
            f"{where_to})")


def _allocate(directory, field, shape, dtype):
    if not directory:
        return np.empty(shape, dtype)
    os.makedirs(directory, exist_ok=True)
    for name in ("ids.npy", "meta.json"):  # incomplete until ids.npy is written again
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    return np.lib.format.open_memmap(os.path.join(directory, f"{field}.npy"), mode="w+", dtype=dtype, shape=shape)


def _open(directory, field) -> FeatureCache | None:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        ids = np.load(os.path.join(directory, "ids.npy"))
        table = np.load(os.path.join(directory, f"{field}.npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("field") != field or list(table.shape) != meta.get("shape") or len(ids) != table.shape[0]:
        return None
    return FeatureCache(field, ids, table)


def for_run(family, params, mesh, config, workdir: str) -> tuple[FeatureCache | None, list[str]]:
    """The run's cache (None when ``config.feature_cache.kind`` is 'off') and notes for the log."""
    k = kind(config)
    if k == "off":
        return None, []
    from ladic_jax.data import pipeline
    inp = config.input
    size = pipeline.num_eval_examples(inp, inp.train_split)
    per_epoch = -(-size // int(inp.batch_size))
    directory = None
    if k == "disk":
        directory = config.feature_cache.get("dir") or os.path.join(workdir, "feature_cache")
        if jax.process_count() > 1:  # each process keeps its own copy (processes may share a host)
            directory = os.path.join(directory, f"process_{jax.process_index()}")
    batches = (sharding.global_batch(b, mesh) for b in pipeline.make_train_iterator(inp, family.tokenizer))
    cache, note = build(jax.jit(family.frozen_features), params, batches, size, 3 * per_epoch,
                        family.feature_field, directory)
    return cache, [note]
