"""Evaluating the checkpoints of a finished or running training run (``ladic-eval``)."""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any

import jax
import ml_collections

from ladic_jax import config as config_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import trainer
from ladic_jax.checkpoint import run_steps
from ladic_jax.evaluation import report
from ladic_jax.evaluation.evaluator import Evaluator, sampler_config


def run_config(workdir: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """The config a run was trained with (saved by the trainer as WORKDIR/config.json).

    Sampler fields added since the run was saved take their defaults, so that they can be overridden.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by ladic-train")
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    if "sampler" in cfg:
        sampler_lib.complete(cfg.sampler)
    if overrides:
        config_lib.apply_overrides(cfg, overrides)
    return cfg


def _tag_fields(sampler_cfg) -> dict[str, Any]:
    """The sampler settings that name an evaluation: flat, with Back&Refine as one "at-keep" value
    ("off" when disabled)."""
    flat = {}
    for key, value in sampler_lib.complete(sampler_cfg.copy_and_resolve_references()).to_dict().items():
        if key == "back_refine":
            flat["br"] = f"{value['at']:g}-{value['keep']:g}" if value["enabled"] else "off"
        else:
            flat[key] = value
    return flat


_TAG_PREFIX = {"steps": "s", "guidance": "w", "mbr": "mbr", "br": "br"}


def eval_tag(base_sampler, sampler_cfg) -> str:
    """File-name tag of an evaluation: its sampler settings that differ from the run's own (``base_sampler``).

    "" for the run's settings; "_s30" (steps), "_w2" (guidance), "_mbr5", "_br0.5-0.5" (Back&Refine
    at-keep), "_eta=0.5" for any other field (``mbr_metric`` only with MBR on); in that order, the
    others sorted.
    """
    base, cur = _tag_fields(base_sampler), _tag_fields(sampler_cfg)
    parts = []
    for key in [*_TAG_PREFIX, *sorted(set(cur) - set(_TAG_PREFIX))]:
        if key not in cur or cur[key] == base.get(key) or (key == "mbr_metric" and cur["mbr"] == 1):
            continue
        value = cur[key]
        text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
        text = re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)
        parts.append(f"_{_TAG_PREFIX[key]}{text}" if key in _TAG_PREFIX else f"_{key}={text}")
    return "".join(parts)


def parse_sweep(specs: list[str]) -> dict[str, list[str]]:
    """["steps=1,5", "guidance=0,1"] -> {"steps": ["1", "5"], "guidance": ["0", "1"]} (sampler fields)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not items:
            raise ValueError(f"--sweep {spec!r} must look like FIELD=V1,V2,... (a config.sampler field, e.g. "
                             "steps=1,5,10,30 guidance=0,1,2)")
        if name in grid:
            raise ValueError(f"--sweep names {name!r} twice")
        grid[name] = items
    return grid


def evaluate_run(workdir: str, *, steps: list[int] | None = None, sampling_steps: list[int] | None = None,
                 guidance: float | None = None, mbr: int | None = None, sweep: dict[str, list[str]] | None = None,
                 trajectory: bool = False, limit: int | None = None, force: bool = False, split: str | None = None,
                 overrides: list[str] | None = None) -> dict[str, dict]:
    """Evaluates the given (default: all) checkpoints at every sampler setting asked for; skips
    evaluations already done unless ``force``.

    The settings are the grid ``sweep`` ({sampler field: values}), or ``sampling_steps`` (a grid over
    steps), or the run's own; ``guidance`` and ``mbr`` are fixed for all. Each evaluation is
    WORKDIR/eval/step_<N><tag>.json (tag from ``eval_tag``, and ``split_tag`` when ``split`` is not the
    config's eval split, so a rerun skips it) with its captions;
    then ``metrics.txt``/``metrics.png`` over all evaluations, and with a sweep, per checkpoint, its
    table and one plot of the metrics against each swept field (``report.write_sweep``). With
    ``trajectory``, each evaluation records the per-step latent distance to the final prediction.
    Returns {file tag: metrics} for what it evaluated.
    """
    config = run_config(workdir, overrides)
    base = run_config(workdir)
    fixed = {k: v for k, v in (("guidance", guidance), ("mbr", mbr)) if v is not None}
    if sweep and sampling_steps:
        raise ValueError("give either --sampling-steps or --sweep (e.g. --sweep steps=5,30), not both")
    grid = dict(sweep or ({"steps": [str(n) for n in sampling_steps]} if sampling_steps else {}))
    both = sorted(set(grid) & set(fixed))
    if both:
        raise ValueError(f"{', '.join(both)}: set both by its flag and by --sweep")
    sk = trainer.skeleton(config)
    if trajectory and not sampler_lib.records_trajectory(sk.family):
        raise ValueError(f"--trajectory: the {config.family!r} model has no denoising trajectory to record")
    points = [_point_config(config, sk.family, {**fixed, **dict(zip(grid, values))})
              for values in itertools.product(*grid.values())]
    ck_steps = run_steps(workdir)
    if not ck_steps:
        raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    wanted = ck_steps if not steps else steps
    missing = sorted(set(wanted) - set(ck_steps))
    if missing:
        raise ValueError(f"no checkpoint for step(s) {missing} in {workdir}; available: {ck_steps}")
    evaluator = Evaluator(sk.family, config, sk.mesh)
    done = {}
    for step in wanted:
        params = None
        for sampler_cfg in points:
            tag = eval_tag(base.sampler, sampler_cfg) + split_tag(config, split)
            if not force and _done(workdir, step, tag, trajectory):
                print(f"[eval] step {step}{tag}: already evaluated, skipping", flush=True)
                continue
            if params is None:
                params = trainer.restore(sk, workdir, step)[1]["params"]
            res = evaluator.run(params, step=step, workdir=workdir, limit=limit, tag=tag, sampler_cfg=sampler_cfg,
                                split=split, trajectory=trajectory)
            if jax.process_index() == 0:
                print(f"[eval] step {step}{tag}: {report.headline(res)} ({res['num_images']} images)", flush=True)
            done[f"step_{step}{tag}"] = res
    evaluator.close()
    if jax.process_index() == 0:
        table_path, plot_path = report.write_report(workdir)
        print(table_path.read_text())
        print(f"[eval] table: {table_path}" + (f", plot: {plot_path}" if plot_path else ""), flush=True)
        if sweep:
            for step in wanted:
                records = [report.read_eval(workdir, step, eval_tag(base.sampler, p)) for p in points]
                table_path, plots = report.write_sweep(workdir, step, records, list(grid))
                print(table_path.read_text())
                print(f"[eval] sweep table: {table_path}, plots: {', '.join(map(str, plots))}", flush=True)
    return done


def _point_config(config, family, settings: dict[str, Any]) -> ml_collections.ConfigDict:
    """The sampler config of one grid point: the run's with ``settings`` applied, validated."""
    cfg = config.copy_and_resolve_references()
    config_lib.apply_overrides(cfg, [f"sampler.{k}={v}" for k, v in settings.items()])
    if hasattr(family, "validate"):
        family.validate(cfg)
    return sampler_config(cfg)


def split_tag(config, split: str | None) -> str:
    """File-tag suffix of an evaluation of another split than ``config.input.eval_split`` ("_train" for the
    training split), so that it sits beside the run's own evaluations."""
    if not split or split == config.input.eval_split:
        return ""
    return "_" + re.sub(r"[^A-Za-z0-9_.=+-]", "-", split)


def _done(workdir: str, step: int, tag: str, trajectory: bool) -> bool:
    if step not in report.evaluated_steps(workdir, tag=tag):
        return False
    return not trajectory or "latent_distance" in report.read_eval(workdir, step, tag)


