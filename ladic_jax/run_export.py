"""Exporting the pretrained parts of a training run so that other configs load them like real weights.

    export_clip_of_run("runs/coca", "runs/coca/clip")   # the newest checkpoint's CLIP, HF CLIP layout
    export_vqvae_of_run("runs/vqvae", "runs/vqvae/vq")  # a VQ-VAE, for the discrete family

A family whose model holds a CLIP (``Family.own_clip``; the ``coca`` family) is exported with the tokenizer
it was trained with and the input pipeline's image normalisation (``preprocessor_config.json``), by
``ladic_jax.encoders.export.export_clip``: ``load_pretrained(dir, "clip")`` (or ``"clip_vision"``, as
``configs/ladic_shapes.py:tower=DIR`` does) reads it back exactly.
"""

from __future__ import annotations

from pathlib import Path

import jax

from ladic_jax import trainer
from ladic_jax.encoders.export import export_clip
from ladic_jax.evaluation.offline import run_config
from ladic_jax.sharding import to_host


def _restore(workdir: str, step: int | None):
    config = run_config(workdir)
    sk = trainer.skeleton(config)
    found = trainer.restore(sk, workdir, step)
    if found is None:
        raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints")
    return config, sk, found[0], found[1]


def export_clip_of_run(workdir: str, out_dir: str, *, step: int | None = None) -> tuple[Path, int]:
    """Writes the CLIP of checkpoint ``step`` (default: the newest good one) of ``workdir`` to ``out_dir``;
    returns the directory and the step exported."""
    config, sk, step, state = _restore(workdir, step)
    own = sk.family.own_clip(state["params"])
    if own is None:
        raise ValueError(f"{workdir} is a {config.family!r} run, whose model has no CLIP to export "
                         "(families with one: coca)")
    _, params, clip_config = own
    params = jax.tree.map(to_host, params)
    path = export_clip(params, clip_config, out_dir, tokenizer=sk.family.tokenizer,
                       image_mean=config.input.image_mean, image_std=config.input.image_std)
    return path, step


def export_vqvae_of_run(workdir: str, out_dir: str, *, step: int | None = None) -> tuple[Path, int]:
    """Writes the VQ-VAE of checkpoint ``step`` (default: the newest good one) of a ``vqvae`` run to
    ``out_dir`` (``models.vqvae.save_vqvae``: what ``model.image_tokenizer.path`` of the discrete family reads)."""
    from ladic_jax.models.vqvae import save_vqvae
    config, sk, step, state = _restore(workdir, step)
    if config.family != "vqvae":
        raise ValueError(f"{workdir} is a {config.family!r} run, not a VQ-VAE (configs/vqvae_shapes.py)")
    params = jax.tree.map(to_host, state["params"])
    inp = config.input
    return save_vqvae(out_dir, sk.family.vq_config, params, image_size=inp.image_size, image_mean=inp.image_mean,
                      image_std=inp.image_std), step
