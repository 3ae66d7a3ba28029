"""ladic-eval: evaluate the checkpoints of a training run (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)."""

from __future__ import annotations

import argparse
import os

from ladic_jax.cli import common


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers (e.g. 5,30)") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="ladic-eval", description="Evaluate every checkpoint of a run (or --step N), skipping those "
        "already evaluated; writes WORKDIR/eval/step_<N>.json, a table and a plot of metrics against step.",
        epilog=common.OVERRIDE_HELP)
    p.add_argument("--workdir", help="a run directory written by ladic-train")
    p.add_argument("--compare", nargs="+", metavar="RUN[:TAG]", default=None,
                   help="instead of evaluating, print a table comparing the newest evaluations of runs (TAG: the "
                        "evaluation's file tag, e.g. runs/ladic:_s30; default: the run's own sampler settings)")
    p.add_argument("--out", default=None, metavar="DIR", help="with --compare: also write DIR/comparison.md "
                   "(the table in Markdown) and DIR/comparison.png (bar charts)")
    p.add_argument("--step", type=_ints, default=None, help="checkpoint step(s), comma-separated")
    p.add_argument("--sampling-steps", type=_ints, default=None,
                   help="denoising steps, comma-separated (default: the config's sampler.steps)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    p.add_argument("--mbr", type=int, default=None, metavar="N",
                   help="N sampled candidates per image, one kept by config.sampler.mbr_metric: Minimum Bayes "
                        "Risk by bleu or cider, or clip (re-ranking by the family's own CLIP); 1: plain sampling")
    p.add_argument("--back-refine", action="store_true", help="Back&Refine (fractions: config.sampler.back_refine)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="FIELD=V1,V2",
                   help="evaluate a grid of sampler settings, e.g. --sweep steps=1,5,10,30 guidance=0,1,2; writes "
                        "a table and a plot of the metrics against each field")
    p.add_argument("--trajectory", action="store_true",
                   help="record the mean latent distance to the final prediction after every denoising step")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--split", default=None, help="a split other than the config's eval_split, e.g. train: its "
                   "evaluation is tagged _<split> (e.g. eval/step_N_train_captions.jsonl, which "
                   "--config.input.train_caption_file accepts for sequence-level distillation)")
    p.add_argument("--force", action="store_true", help="re-evaluate checkpoints already evaluated")
    args, overrides = common.parse(p, argv)
    if args.compare:
        from ladic_jax.evaluation import report
        rows = []
        for spec in args.compare:
            run, _, tag = spec.partition(":")
            try:
                rows.append((spec, report.run_summary(run, tag)))
            except (FileNotFoundError, ValueError) as e:
                common.fail(str(e))
        print(report.format_comparison(rows), end="")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "comparison.md"), "w") as f:
                f.write(report.format_comparison(rows, markdown=True))
            report.plot_comparison(rows, os.path.join(args.out, "comparison.png"))
            print(f"table: {os.path.join(args.out, 'comparison.md')}, plot: {os.path.join(args.out, 'comparison.png')}")
        return
    if not args.workdir:
        p.error("the following arguments are required: --workdir (or --compare)")
    if args.back_refine:
        overrides.append("sampler.back_refine.enabled=true")
    common.setup_logging()
    from ladic_jax.checkpoint import CheckpointError
    from ladic_jax.evaluation import offline
    try:  # the run, the overrides, the tokenizer and the data: checked before the model is built and compiled
        config = offline.run_config(args.workdir, overrides)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    common.check_tokenizer(config)
    common.check_dataset(config.input)
    try:
        sweep = offline.parse_sweep(args.sweep) if args.sweep else None
        offline.evaluate_run(args.workdir, steps=args.step, sampling_steps=args.sampling_steps,
                             guidance=args.guidance, mbr=args.mbr, sweep=sweep, trajectory=args.trajectory,
                             limit=args.limit, force=args.force, overrides=overrides, split=args.split)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    except CheckpointError as e:  # a checkpoint that cannot be read: not a usage error
        common.fail(str(e), code=1)

if __name__ == "__main__":
    main()
