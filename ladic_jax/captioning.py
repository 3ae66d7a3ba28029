"""Captioning image files with a trained run: ``Captioner(workdir).caption_files(paths)``."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterator, Sequence

import jax
import numpy as np

from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding
from ladic_jax import trainer
from ladic_jax.data import image_files
from ladic_jax.evaluation.evaluator import sampler_config
from ladic_jax.evaluation.offline import run_config


@dataclasses.dataclass
class Result:
    path: str
    caption: str | None = None
    error: str | None = None


class Captioner:
    """Loads a run's config and a checkpoint (default: the newest good one) once; captions batches."""

    def __init__(self, workdir: str, *, step: int | None = None, overrides: list[str] | None = None):
        self.config = run_config(workdir, overrides)
        self.sk = trainer.skeleton(self.config)
        found = trainer.restore(self.sk, workdir, step)
        if found is None:
            raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints")
        self.step, state = found
        self.params = state["params"]
        self._sample_fns = sampler_lib.SampleFns(self.sk.family)

    def caption_arrays(self, images: np.ndarray, *, seed: int = 0, pad_to: int = 0,
                       **sampler_overrides) -> list[str]:
        """Normalised images (B, H, W, 3) -> captions. The batch is padded (with zero images) to a
        multiple of the data-parallel size, and to ``pad_to`` so that batches of any size up to it
        reuse one compiled sampler."""
        fn = self._sample_fns(sampler_config(self.config, **sampler_overrides))
        n = len(images)
        dp = sharding.data_parallel_size(self.sk.mesh)
        pad = max(pad_to - n, 0)
        pad += (-(n + pad)) % dp
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        batch = sharding.global_batch({"image": images}, self.sk.mesh)
        tokens = np.asarray(jax.device_get(fn(self.params, batch, jax.random.key(seed))))
        return self.sk.family.decode(tokens[:n])

    def caption_files(self, paths: Sequence[str], *, batch_size: int = 32, progress: bool = False,
                      seed: int = 0, **sampler_overrides) -> Iterator[Result]:
        """Captions every readable image among ``paths`` (files, or directories searched recursively),
        ``batch_size`` at a time, yielding one Result per file in order. A file that cannot be read, or
        a directory without image files, is yielded with ``error`` set and the rest go on. ``progress``
        draws a bar on stderr."""
        inp = self.config.input
        files: list[tuple[str, str | None]] = []  # (path, error)
        for p in paths:
            found = list(image_files.iter_image_paths([p]))
            if not found and os.path.isdir(p):
                files.append((p, f"{p}: directory without image files ({' '.join(image_files.EXTENSIONS)})"))
            files.extend((f, None) for f in found)
        # With several batches, the last one is padded to the same size: one compilation for all.
        pad_to = batch_size if len(files) > batch_size else 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), unit="img", desc="captioning", file=sys.stderr)
        pending: list[tuple[str, np.ndarray | None, str | None]] = []

        def flush():
            good = [a for _, a, _ in pending if a is not None]
            caps = iter(self.caption_arrays(np.stack(good), seed=seed, pad_to=pad_to, **sampler_overrides)
                        if good else [])
            out = [Result(p, error=e) if a is None else Result(p, caption=next(caps)) for p, a, e in pending]
            if bar:
                bar.update(len(pending))
            pending.clear()
            return out

        ready = 0
        for path, error in files:
            array = None
            if error is None:
                try:
                    rgb = image_files.read_rgb(path)
                    array = image_files.preprocess(rgb, inp.image_size, inp.image_mean, inp.image_std)
                    ready += 1
                except image_files.ImageReadError as e:
                    error = str(e)
            pending.append((path, array, error))
            if ready == batch_size:
                ready = 0
                yield from flush()
        if pending:
            yield from flush()
        if bar:
            bar.close()
