"""ladic-caption: caption image files (or directories of them) with a trained run."""

from __future__ import annotations

import argparse
import json
import sys

from ladic_jax.cli import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="ladic-caption", description="Print one caption per image. Files that cannot be read are "
        "reported on stderr by name with the reason; the others are captioned.", epilog=common.OVERRIDE_HELP)
    p.add_argument("--workdir", required=True, help="a run directory written by ladic-train")
    p.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight w")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON record per file on stdout")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    args, overrides = common.parse(p, argv)
    common.setup_logging()
    from ladic_jax.captioning import Captioner
    try:
        cap = Captioner(args.workdir, step=args.step, overrides=overrides)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    failed = 0
    if args.batch_size < 1:
        common.fail(f"--batch-size must be positive, got {args.batch_size}")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    for r in cap.caption_files(args.images, batch_size=args.batch_size, progress=progress, seed=args.seed,
                               steps=args.steps, guidance=args.guidance):
        if args.json:
            print(json.dumps({"path": r.path, "caption": r.caption, "error": r.error}), flush=True)
        elif r.error:
            print(f"skipped {r.error}", file=sys.stderr, flush=True)
        else:
            print(f"{r.path}\t{r.caption}", flush=True)
        failed += r.error is not None
    if failed:
        print(f"{failed} file(s) could not be read", file=sys.stderr)


if __name__ == "__main__":
    main()
