#!/usr/bin/env python3
"""Learning curves on the shapes data: BLEU-4 and the fully-correct fraction of captions against training
steps (and training time) for LaDiC with its image encoder trained from scratch, LaDiC on the frozen
pretrained tower, and the autoregressive captioner of the shapes vision-language model.

    scripts/learning_curve.py --data_dir data --out runs/curve --tower runs/demo/clip \
        --steps 350,700,1400,2800,5600 --variants scratch,tower,ar

Each variant is one training run of max(steps) steps that keeps a checkpoint at every listed step (the
learning-rate schedule is that of the longest run: an early checkpoint is a run cut short, not a shorter run
with its schedule completed); each checkpoint is then evaluated on the test split (LaDiC: 5 DDIM steps;
the autoregressive captioner: greedy). Training time is the sum over logged intervals of steps / (steps/s),
so it excludes evaluation and start-up. Writes OUT/curve.md (a table) and OUT/curve.png (plots against
steps and against training time). Re-running resumes unfinished runs and skips done evaluations; a variant
written NAME:UNTIL stops at step UNTIL (its schedule still that of max(steps)), so that a later run with a
larger UNTIL, or none, extends its curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "scratch": ("LaDiC, image encoder from scratch", "configs/ladic_shapes.py"),
    "tower": ("LaDiC, frozen pretrained tower", "configs/ladic_shapes.py:tower={tower}"),
    "ar": ("autoregressive captioner (coca, greedy)", "configs/coca_shapes.py"),
}


def run_variant(name: str, spec: str, steps: list[int], data_dir: str, workdir: str,
                until: int | None = None) -> dict[int, dict]:
    from ladic_jax import config as config_lib
    from ladic_jax import trainer
    from ladic_jax.evaluation import offline, report

    every = math.gcd(*steps)
    config = config_lib.load_config(os.path.join(REPO, spec) + ("," if ":" in spec else ":") + f"steps={max(steps)}")
    config_lib.apply_overrides(config, [f"input.data_dir={data_dir}", f"checkpoint.every_steps={every}",
                                        f"checkpoint.keep={max(steps) // every + 1}", "eval.at_end=false",
                                        f"stop_at_step={until or 0}"])
    if until:
        steps = [s for s in steps if s <= until]
    print(f"== {name}: {spec}, {max(steps)} steps, checkpoints every {every}"
          + (f", stopping at {until} (resumable)" if until else ""), flush=True)
    trainer.train_and_evaluate(config, workdir)
    sampling = [5] if config.family == "ladic" else None
    offline.evaluate_run(workdir, steps=steps, sampling_steps=sampling)
    tag = "_s5" if sampling and config.sampler.steps != 5 else ""
    seconds = report.train_seconds(workdir)
    return {s: {**report.read_eval(workdir, s, tag), "train_seconds": seconds.get(s)} for s in steps}


def write_outputs(results: dict[str, dict[int, dict]], out: str) -> None:
    from matplotlib.figure import Figure

    lines = ["| variant | steps | train time (min) | BLEU-4 | CIDEr | fully correct | object F1 | relations true |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in results.items():
        for step, r in sorted(rows.items()):
            t = r.get("train_seconds")
            lines.append(f"| {VARIANTS[key][0]} | {step} | {'-' if t is None else f'{t / 60:.1f}'} | "
                         f"{r['bleu_4']:.3f} | {r['cider']:.3f} | {r.get('sem_fully_correct', float('nan')):.3f} | "
                         f"{r.get('sem_object_f1', float('nan')):.3f} | "
                         f"{(r.get('sem_relation_accuracy') or float('nan')):.3f} |")
    with open(os.path.join(out, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    for col, (xkey, xlabel) in enumerate((("step", "training steps"), ("train_seconds", "training time (min)"))):
        for row, (metric, title) in enumerate((("bleu_4", "BLEU-4 (test)"), ("sem_fully_correct",
                                                                             "fully correct captions (test)"))):
            ax = axes[row, col]
            for key, rows in results.items():
                pts = sorted((step if xkey == "step" else (r.get("train_seconds") or math.nan) / 60,
                              r.get(metric, math.nan)) for step, r in rows.items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=VARIANTS[key][0])
            if xkey == "step":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0, 0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=110)
    print(f"table: {os.path.join(out, 'curve.md')}, plot: {os.path.join(out, 'curve.png')}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True, help="directory for the runs, the table and the plot")
    p.add_argument("--steps", default="350,700,1400,2800,5600")
    p.add_argument("--variants", default="scratch,tower,ar")
    p.add_argument("--tower", default=None, help="the exported shapes CLIP (ladic-convert clip), for 'tower'")
    args = p.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",") if s})
    variants = dict(v.partition(":")[::2] for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    bad_until = [u for u in variants.values() if u and not (u.isdigit() and int(u) > 0)]
    if unknown or bad_until or not steps or min(steps) < 1:
        p.error(f"--variants must be among {sorted(VARIANTS)}, each optionally :UNTIL (a positive step) "
                f"(got {unknown or bad_until}); --steps positive ints")
    if "tower" in variants and not (args.tower and os.path.exists(os.path.join(args.tower, "config.json"))):
        p.error("variant 'tower' needs --tower DIR, a directory written by `ladic-convert clip`")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for v, until in variants.items():
        spec = VARIANTS[v][1].format(tower=os.path.abspath(args.tower or ""))
        results[v] = run_variant(v, spec, steps, args.data_dir, os.path.join(args.out, v),
                                 int(until) if until else None)
        write_outputs(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
