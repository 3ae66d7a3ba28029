"""Exporting the pretrained parts of a training run so that other configs load them like real weights.

    export_clip_of_run("runs/coca", "runs/coca/clip")   # the newest checkpoint's CLIP, HF CLIP layout

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


def export_clip_of_run(workdir: str, out_dir: str, *, step: int | None = None) -> tuple[Path, int]:
    """Writes the CLIP of checkpoint ``step`` (default: the newest good one) of ``workdir`` to ``out_dir``;
    returns the directory and the step exported."""
    config = run_config(workdir)
    sk = trainer.skeleton(config)
    found = trainer.restore(sk, workdir, step)
    if found is None:
        raise FileNotFoundError(f"no usable checkpoint in {workdir}/checkpoints")
    step, state = found
    own = sk.family.own_clip(state["params"])
    if own is None:
        raise ValueError(f"{workdir} is a {config.family!r} run, whose model has no CLIP to export "
                         "(families with one: coca)")
    _, params, clip_config = own
    params = jax.tree.map(to_host, params)
    path = export_clip(params, clip_config, out_dir, tokenizer=sk.family.tokenizer,
                       image_mean=config.input.image_mean, image_std=config.input.image_std)
    return path, step
