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
from ladic_jax.data import text as text_lib
from ladic_jax.evaluation.evaluator import mbr_sample, sampler_config
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

    def caption_arrays(self, images: np.ndarray, *, seed: int = 0, template: str | None = None,
                       **sampler_overrides) -> list[str]:
        """Normalised images (B, H, W, 3) -> captions (see ``sample_arrays``)."""
        return self.sample_arrays(images, seed=seed, template=template, **sampler_overrides)[0]

    def sample_arrays(self, images: np.ndarray, *, seed: int = 0, template: str | None = None,
                      show_steps: bool = False, **sampler_overrides) -> tuple[list[str], list[list[str]] | None]:
        """Normalised images (B, H, W, 3) -> (captions, per image the caption after every loop step or None).

        ``template``: infill it ("a [MASK] dog on the [MASK]", see ``text.tokenize_template``) instead
        of captioning freely. ``sampler_overrides`` (steps, guidance, mbr, ...) change the run's sampler.
        """
        sampler_cfg = sampler_config(self.config, **sampler_overrides)
        fn = self._sample_fns(sampler_cfg, show_steps)
        n = len(images)
        dp = sharding.data_parallel_size(self.sk.mesh)
        pad = (-n) % dp
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
        captions, chosen, outputs, _ = mbr_sample(sample, jax.random.key(seed), int(sampler_cfg.mbr), decode,
                                                  sampler_cfg.mbr_metric)
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
        """Captions every readable image among ``paths`` (files or directories); unreadable ones are
        yielded with ``error`` set and the rest go on. ``sample_kwargs`` go to ``sample_arrays``."""
        inp = self.config.input
        files = list(image_files.iter_image_paths(paths))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), unit="img", desc="captioning")
        pending: list[tuple[str, np.ndarray]] = []

        def flush():
            arrays = np.stack([a for _, a in pending])
            caps, steps = self.sample_arrays(arrays, **sample_kwargs)
            out = [Result(p, caption=c, steps=steps[i] if steps else None)
                   for i, ((p, _), c) in enumerate(zip(pending, caps))]
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
