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
from ladic_jax.data import text as text_lib
from ladic_jax.evaluation.evaluator import clip_ranker, mbr_sample, own_clip_scorer, sampler_config
from ladic_jax.evaluation.offline import run_config


@dataclasses.dataclass
class Result:
    path: str
    caption: str | None = None
    error: str | None = None
    steps: list[str] | None = None  # with show_steps: the caption decoded after every sampler step


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
        self._ranker = None  # the family's own CLIP, for sampler.mbr_metric="clip"

    def caption_arrays(self, images: np.ndarray, *, seed: int = 0, template: str | None = None,
                       **sampler_overrides) -> list[str]:
        """Normalised images (B, H, W, 3) -> captions (see ``sample_arrays``)."""
        return self.sample_arrays(images, seed=seed, template=template, **sampler_overrides)[0]

    def sample_arrays(self, images: np.ndarray, *, seed: int = 0, template: str | None = None,
                      show_steps: bool = False, pad_to: int = 0,
                      **sampler_overrides) -> tuple[list[str], list[list[str]] | None]:
        """Normalised images (B, H, W, 3) -> (captions, per image the caption after every loop step or None).

        ``template``: infill it ("a [MASK] dog on the [MASK]", see ``text.tokenize_template``) instead
        of captioning freely. ``sampler_overrides`` (steps, guidance, mbr, ...) change the run's sampler.
        The batch is padded (with zero images) to a multiple of the data-parallel size, and to ``pad_to``
        so that batches of any size up to it reuse one compiled sampler.
        """
        sampler_cfg = sampler_config(self.config, **sampler_overrides)
        fn = self._sample_fns(sampler_cfg, show_steps)
        n = len(images)
        dp = sharding.data_parallel_size(self.sk.mesh)
        pad = max(pad_to - n, 0)
        pad += (-(n + pad)) % dp
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        arrays = {"image": images}
        if template is not None:
            tokens, given = self.template_arrays(template)
            arrays["template_tokens"] = np.tile(tokens, (len(images), 1))
            arrays["template_given"] = np.tile(given, (len(images), 1))
        batch = sharding.global_batch(arrays, self.sk.mesh)
        sample = lambda key: jax.tree.map(lambda a: np.asarray(jax.device_get(a))[:n],  # noqa: E731
                                          fn(self.params, batch, key))
        decode = lambda out: self.sk.family.decode(out["tokens"] if show_steps else out)  # noqa: E731
        rank = None
        if int(sampler_cfg.mbr) > 1 and sampler_cfg.mbr_metric == "clip":
            if self._ranker is None:
                self._ranker = own_clip_scorer(self.sk.family, self.params, self.config)
            inp = self.config.input
            rank = clip_ranker(self._ranker, self._ranker.image_embeddings(images[:n], inp.image_mean, inp.image_std))
        captions, chosen, outputs, _ = mbr_sample(sample, jax.random.key(seed), int(sampler_cfg.mbr), decode,
                                                  sampler_cfg.mbr_metric, rank)
        if not show_steps:
            return captions, None
        return captions, [self.sk.family.decode(outputs[c]["step_tokens"][i]) for i, c in enumerate(chosen)]

    def template_arrays(self, template: str) -> tuple[np.ndarray, np.ndarray]:
        """An infilling template's token ids and given-mask (L,); a bad template raises ValueError."""
        return text_lib.tokenize_template(self.sk.family.tokenizer, template, int(self.config.input.max_length))

    def loop_timesteps(self, **sampler_overrides) -> list[int]:
        """The timestep of every sampler step (Back&Refine's restart included), to label ``Result.steps``."""
        return sampler_lib.loop_timesteps(self.sk.family, sampler_config(self.config, **sampler_overrides)).tolist()

    def caption_files(self, paths: Sequence[str], *, batch_size: int = 32, progress: bool = False,
                      **sample_kwargs) -> Iterator[Result]:
        """Captions every readable image among ``paths`` (files, or directories searched recursively),
        ``batch_size`` at a time, yielding one Result per file in order. A file that cannot be read, or
        a directory without image files, is yielded with ``error`` set and the rest go on. ``progress``
        draws a bar on stderr. ``sample_kwargs`` (seed, template, show_steps, sampler fields) go to
        ``sample_arrays``."""
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
            caps, steps = self.sample_arrays(np.stack(good), pad_to=pad_to, **sample_kwargs) if good else ([], None)
            results = iter(zip(caps, steps or [None] * len(caps)))
            out = []
            for p, a, e in pending:
                if a is None:
                    out.append(Result(p, error=e))
                else:
                    c, st = next(results)
                    out.append(Result(p, caption=c, steps=st))
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
