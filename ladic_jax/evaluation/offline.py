"""Evaluating the checkpoints of a finished or running training run (``ladic-eval``)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from ladic_jax import trainer
from ladic_jax.checkpoint import Checkpointer
from ladic_jax.evaluation import report
from ladic_jax.evaluation.evaluator import Evaluator


def run_config(workdir: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """The config a run was trained with (saved by the trainer as WORKDIR/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by ladic-train")
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    if overrides:
        from ladic_jax import config as config_lib
        config_lib.apply_overrides(cfg, overrides)
    return cfg


def eval_tag(config, sampling_steps: int, guidance: float | None) -> str:
    """File-name tag of an evaluation: "" for the config's own sampler settings."""
    tag = "" if sampling_steps == config.sampler.steps else f"_s{sampling_steps}"
    if guidance is not None and guidance != config.sampler.guidance:
        tag += f"_w{guidance:g}"
    return tag


def evaluate_run(workdir: str, *, steps: list[int] | None = None, sampling_steps: list[int] | None = None,
                 guidance: float | None = None, limit: int | None = None, force: bool = False,
                 overrides: list[str] | None = None) -> dict[str, dict]:
    """Evaluates the given (default: all) checkpoints; skips ones already evaluated unless ``force``.

    Writes WORKDIR/eval/step_<N>[tag].json, the captions beside them, ``table.txt`` and ``metrics.png``.
    Returns {file tag: metrics} for what it evaluated.
    """
    config = run_config(workdir, overrides)
    sk = trainer.skeleton(config)
    ck_steps = _checkpoint_steps(workdir)
    if not ck_steps:
        raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    wanted = ck_steps if not steps else steps
    missing = sorted(set(wanted) - set(ck_steps))
    if missing:
        raise ValueError(f"no checkpoint for step(s) {missing} in {workdir}; available: {ck_steps}")
    evaluator = Evaluator(sk.family, config, sk.mesh)
    done = {}
    for n_sampling in (sampling_steps or [int(config.sampler.steps)]):
        tag = eval_tag(config, n_sampling, guidance)
        already = set(report.evaluated_steps(workdir, tag=tag))
        for step in wanted:
            if step in already and not force:
                print(f"[eval] step {step}{tag}: already evaluated, skipping", flush=True)
                continue
            _, state = trainer.restore(sk, workdir, step)
            res = evaluator.run(state["params"], step=step, workdir=workdir, limit=limit, tag=tag,
                                steps=n_sampling, guidance=guidance)
            if jax.process_index() == 0:
                print(f"[eval] step {step}{tag}: BLEU-4 {res['bleu_4']:.4f} CIDEr {res['cider']:.4f} "
                      f"({res['num_images']} images)", flush=True)
            done[f"step_{step}{tag}"] = res
    evaluator.close()
    if jax.process_index() == 0:
        table_path, plot_path = report.write_report(workdir)
        print(table_path.read_text())
        print(f"[eval] table: {table_path}" + (f", plot: {plot_path}" if plot_path else ""), flush=True)
    return done


def _checkpoint_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    ck = Checkpointer(path, read_only=True)
    try:
        return ck.all_steps()
    finally:
        ck.close()
