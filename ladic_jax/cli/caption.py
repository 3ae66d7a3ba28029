"""ladic-caption: caption image files (or directories of them) with a trained run."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ladic_jax.cli import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="ladic-caption", description="Print one caption per image. Files that cannot be read are "
        "reported on stderr by name with the reason; the others are captioned. A path that does not exist, a "
        "tokenizer that does not load or a step without a checkpoint stops it before the model is loaded.",
        epilog=common.OVERRIDE_HELP)
    p.add_argument("--workdir", required=True, help="a run directory written by ladic-train")
    p.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    p.add_argument("--mbr", type=int, default=None, metavar="N",
                   help="sample N candidates per image and keep the one agreeing most with the others")
    p.add_argument("--back-refine", action="store_true", help="Back&Refine (fractions: config.sampler.back_refine)")
    p.add_argument("--template", default=None, help='infill a caption with blanks, e.g. "a [MASK] circle left of '
                   'a [MASK] square": each [MASK] is one word piece to fill; the template sets the length')
    p.add_argument("--show-steps", action="store_true", help="also print the caption decoded after every step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON record per file on stdout")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    args, overrides = common.parse(p, argv)
    if args.back_refine:
        overrides.append("sampler.back_refine.enabled=true")
    if args.batch_size < 1:
        common.fail(f"--batch-size must be positive, got {args.batch_size}")
    missing = [path for path in args.images if not os.path.exists(path)]
    if missing:
        common.fail(f"no such file or directory: {', '.join(missing)} (give image files and/or directories of them)")
    common.setup_logging()
    from ladic_jax import sampler as sampler_lib
    from ladic_jax.captioning import Captioner
    from ladic_jax.checkpoint import CheckpointError, run_steps
    from ladic_jax.data import text as text_lib
    from ladic_jax.evaluation.offline import run_config
    # The run, the overrides, the tokenizer, the template and the checkpoint: checked before the model is loaded.
    try:
        config = run_config(args.workdir, overrides)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    tokenizer = common.check_tokenizer(config)
    if args.template is not None:
        try:
            text_lib.tokenize_template(tokenizer, args.template, int(config.input.max_length))
        except ValueError as e:
            common.fail(f"--template: {e}")
    steps = run_steps(args.workdir)
    if not steps:
        common.fail(f"no checkpoints in {args.workdir}/checkpoints: --workdir must be a run with a checkpoint")
    if args.step is not None and args.step not in steps:
        common.fail(f"--step {args.step}: no checkpoint for that step in {args.workdir}; available: {steps}")
    sampler = {"steps": args.steps, "guidance": args.guidance, "mbr": args.mbr}
    try:
        cap = Captioner(args.workdir, step=args.step, overrides=overrides)
        timesteps = cap.loop_timesteps(**sampler)  # also checks the sampler settings
        if args.show_steps and not sampler_lib.records_trajectory(cap.sk.family):
            raise ValueError(f"--show-steps: the {cap.config.family!r} model has no denoising steps to show")
        if args.template is not None:
            cap.template_arrays(args.template)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    except CheckpointError as e:  # a checkpoint that cannot be read: not a usage error
        common.fail(str(e), code=1)
    failed = 0
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    for r in cap.caption_files(args.images, batch_size=args.batch_size, progress=progress, seed=args.seed,
                               template=args.template, show_steps=args.show_steps, **sampler):
        if args.json:
            record = {"path": r.path, "caption": r.caption, "error": r.error}
            if args.show_steps:
                record["steps"] = None if r.steps is None else [
                    {"t": t, "caption": c} for t, c in zip(timesteps, r.steps)]
            print(json.dumps(record), flush=True)
        elif r.error:
            print(f"skipped {r.error}", file=sys.stderr, flush=True)
        else:
            for i, (t, c) in enumerate(zip(timesteps, r.steps or ())):
                print(f"{r.path}\tstep {i + 1}/{len(timesteps)} t={t}\t{c}", flush=True)
            print(f"{r.path}\t{r.caption}", flush=True)
        failed += r.error is not None
    if failed:
        print(f"{failed} file(s) could not be read", file=sys.stderr)

if __name__ == "__main__":
    main()
