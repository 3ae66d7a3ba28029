"""Captioning image files with a trained run: ``Captioner(workdir).caption_files(paths)``."""

from __future__ import annotations

import dataclasses
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

    def caption_arrays(self, images: np.ndarray, *, seed: int = 0, **sampler_overrides) -> list[str]:
        """Normalised images (B, H, W, 3) -> captions."""
        fn = self._sample_fns(sampler_config(self.config, **sampler_overrides))
        n = len(images)
        dp = sharding.data_parallel_size(self.sk.mesh)
        pad = (-n) % dp
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        batch = sharding.global_batch({"image": images}, self.sk.mesh)
        tokens = np.asarray(jax.device_get(fn(self.params, batch, jax.random.key(seed))))
        return self.sk.family.decode(tokens[:n])

    def caption_files(self, paths: Sequence[str], *, batch_size: int = 32, progress: bool = False,
                      **sampler_overrides) -> Iterator[Result]:
        """Captions every readable image among ``paths`` (files or directories); unreadable ones are
        yielded with ``error`` set and the rest go on."""
        inp = self.config.input
        files = list(image_files.iter_image_paths(paths))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), unit="img", desc="captioning")
        pending: list[tuple[str, np.ndarray]] = []

        def flush():
            arrays = np.stack([a for _, a in pending])
            caps = self.caption_arrays(arrays, **sampler_overrides)
            out = [Result(p, caption=c) for (p, _), c in zip(pending, caps)]
            pending.clear()
            return out

        for path in files:
            try:
                rgb = image_files.read_rgb(path)
                pending.append((path, image_files.preprocess(rgb, inp.image_size, inp.image_mean, inp.image_std)))
            except image_files.ImageReadError as e:
                yield Result(path, error=str(e))
            if bar:
                bar.update(1)
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()
        if bar:
            bar.close()
