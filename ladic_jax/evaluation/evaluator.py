"""The one evaluator: sample captions for an evaluation split, score them, write the results.

Works for every family through the shared sampler loop. Every example is scored exactly once on any
number of processes (the eval input pads with ``_mask``); token ids are gathered to process 0, which
decodes, scores with pycocoevalcap and writes ``WORKDIR/eval/step_<N>.json`` plus the captions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding
from ladic_jax.data import pipeline
from ladic_jax.evaluation import metrics as metrics_lib
from ladic_jax.evaluation import report

log = logging.getLogger(__name__)


def sampler_config(config, **overrides):
    """config.sampler with overrides (e.g. steps=30, guidance=0.0), unlocked copy."""
    cfg = config.sampler.copy_and_resolve_references()
    with cfg.unlocked():
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
    return cfg


def _to_numpy(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
    """``Evaluator(family, config, mesh).run(params, step=..., workdir=...)`` -> metrics dict."""

    def __init__(self, family, config, mesh):
        self.family = family
        self.config = config
        self.mesh = mesh
        self._sample_fns = sampler_lib.SampleFns(family, out_shardings=sharding.batch_sharding(mesh, 2))
        self._scorer = None  # one METEOR JVM for all evaluations of this evaluator

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def caption_batches(self, params, *, sampler_cfg, split=None, limit=None, rng=None):
        """Yields (image_ids, captions, references, sampling seconds) per evaluation batch, valid
        examples only."""
        fn = self._sample_fns(sampler_cfg)
        rng = jax.random.key(self.config.seed + 1) if rng is None else rng
        it = pipeline.make_eval_iterator(self.config.input, self.family.tokenizer, split=split, limit=limit)
        for i, batch in enumerate(it):
            gb = sharding.global_batch(batch, self.mesh)
            t0 = time.perf_counter()
            tokens = _to_numpy(fn(params, gb, jax.random.fold_in(rng, i)))
            dt = time.perf_counter() - t0
            ids = _to_numpy(gb["image_id"])
            mask = _to_numpy(gb["_mask"]).astype(bool)
            refs = self._gather_references(batch)
            captions = self.family.decode(tokens[mask])
            yield ids[mask], captions, [refs[int(k)] for k in ids[mask]] if refs is not None else None, dt

    def _gather_references(self, batch) -> dict[int, list[str]] | None:
        local = {int(i): list(r) for i, r, m in zip(batch["image_id"], batch["references"], batch["_mask"]) if m}
        if jax.process_count() == 1:
            return local
        # Strings cannot ride on device arrays: exchange them as JSON bytes through a padded uint8 array.
        blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
        size = int(np.max(multihost_utils.process_allgather(np.array([blob.size]))))
        padded = np.zeros(size, np.uint8)
        padded[: blob.size] = blob
        allb = multihost_utils.process_allgather(padded)
        merged: dict[int, list[str]] = {}
        for row in np.asarray(allb).reshape(jax.process_count(), size):
            merged.update({int(k): v for k, v in json.loads(bytes(row).rstrip(b"\0").decode()).items()})
        return merged

    def run(self, params, *, step: int, workdir: str | None, split=None, limit=None, write=True,
            tag: str = "", **sampler_overrides) -> dict:
        sampler_cfg = sampler_config(self.config, **sampler_overrides)
        records, seconds, timed, first = [], 0.0, 0, True
        for ids, caps, refs, dt in self.caption_batches(params, sampler_cfg=sampler_cfg, split=split,
                                                        limit=limit):
            if first:  # the first call includes compilation: leave it out of the timing
                first = False
            else:
                seconds, timed = seconds + dt, timed + len(ids)
            for i, c, r in zip(ids, caps, refs):
                records.append({"image_id": int(i), "caption": c, "references": r})
        n = len(records)
        result: dict[str, Any] = {"num_images": n, "sampling_steps": int(sampler_cfg.steps),
                                  "guidance": float(sampler_cfg.get("guidance", 0.0)),
                                  "seconds_per_image": seconds / timed if timed > 0 else None}
        if jax.process_index() == 0:
            preds = {r["image_id"]: r["caption"] for r in records}
            refs = {r["image_id"]: r["references"] for r in records}
            if self._scorer is None:
                self._scorer = metrics_lib.CaptionScorer()
            result.update(self._scorer(preds, refs))
            caps = [r["caption"] for r in records]
            result["dist_1"] = metrics_lib.distinct_n(caps, 1)
            result["dist_2"] = metrics_lib.distinct_n(caps, 2)
            if write and workdir:
                report.write_eval(workdir, step, result, records, tag=tag)
        return result
