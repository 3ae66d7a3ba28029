"""`ladic-data`: build the synthetic captioning dataset and look at any captioning dataset.

    ladic-data build shapes_captions [--config default|long|tiny] --data_dir DIR
    ladic-data show --dataset shapes_captions --split test --data_dir DIR --out sheet.png [--num 16]
                    [--captions WORKDIR/eval/step_N_captions.jsonl]

`build` generates `shapes_captions` (nothing is downloaded) and prints where it went and how long it took.
`show` renders the first examples of a split of any prepared TFDS captioning dataset (`shapes_captions`,
`shapes_captions/long`, `coco_captions`, ...) as a grid of upscaled images, each with its reference captions
underneath, so the captions can be checked against the pictures by eye. With `--captions` (the evaluator's
JSON lines of image_id and caption) it shows the captioned images with the generated caption first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

_BUILDABLE = ("shapes_captions",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladic-data",
        description="Build the synthetic captioning dataset (shapes_captions) and render sheets of images "
                    "with their captions from any TFDS captioning dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  ladic-data build shapes_captions --data_dir ~/tensorflow_datasets\n"
               "  ladic-data build shapes_captions --config long --data_dir ~/tensorflow_datasets\n"
               "  ladic-data show --dataset shapes_captions --split test --data_dir ~/tensorflow_datasets "
               "--out sheet.png\n")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,show}")

    build = commands.add_parser(
        "build", help="generate a synthetic dataset into a TFDS data dir",
        description="Generate shapes_captions (coloured shapes with five template captions each) into "
                    "DATA_DIR/shapes_captions/CONFIG/VERSION. Reuses the data if it is already there.")
    build.add_argument("dataset", choices=_BUILDABLE, help="dataset to generate")
    build.add_argument("--config", default="default", choices=("default", "long", "tiny"),
                       help="default: 64px, 1-3 shapes, 5000/500/500 images; long: 128px, 4-6 shapes, "
                            "paragraph captions; tiny: 48/16/16 default images (default: %(default)s)")
    build.add_argument("--data_dir", required=True, help="TFDS data directory to write into")

    show = commands.add_parser(
        "show", help="render a sheet of images with their captions",
        description="Render the first NUM examples of a split of a prepared TFDS captioning dataset "
                    "(features image and captions/text, like coco_captions) as a PNG grid.")
    show.add_argument("--dataset", required=True,
                      help="TFDS name, optionally with config: shapes_captions, shapes_captions/long, "
                           "coco_captions")
    show.add_argument("--split", default="test", help="split to show (default: %(default)s)")
    show.add_argument("--data_dir", required=True, help="TFDS data directory holding the dataset")
    show.add_argument("--out", required=True, help="output image path (.png)")
    show.add_argument("--num", type=int, default=16, help="number of images (default: %(default)s)")
    show.add_argument("--columns", type=int, default=4, help="images per row (default: %(default)s)")
    show.add_argument("--tile", type=int, default=256,
                      help="pixels each image is scaled to fit; 64px images are upscaled 4x by the default "
                           "(default: %(default)s)")
    show.add_argument("--captions", default=None, metavar="JSONL",
                      help="generated captions to show with the references: a JSON-lines file of records "
                           "with image_id and caption, e.g. WORKDIR/eval/step_N_captions.jsonl")
    show.add_argument("--num_refs", type=int, default=5,
                      help="reference captions printed per image (default: %(default)s)")
    return parser


def _build(args: argparse.Namespace) -> None:
    from ladic_jax.data import shapes_captions

    report = shapes_captions.build(os.path.expanduser(args.data_dir), args.config)
    sizes = ", ".join(f"{k} {v}" for k, v in report.split_sizes.items())
    verb = "already present, reused" if report.reused else "built"
    print(f"{args.dataset}/{report.config}: {verb} in {report.seconds:.1f} s ({sizes} images)")
    print(f"data: {report.path}")


def _show(args: argparse.Namespace) -> None:
    from ladic_jax.data import caption_sheet

    data_dir = os.path.expanduser(args.data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {args.data_dir!r} is not a directory")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out {args.out!r}: directory {out_dir!r} does not exist")
    sheet = caption_sheet.write_dataset_sheet(args.dataset, args.split, data_dir, args.out, num=args.num,
                                              columns=args.columns, tile=args.tile,
                                              max_captions=args.num_refs, generated_path=args.captions)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}px) from {args.dataset} split {args.split}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ladic-data` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's start-up chatter out of the way.
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    try:
        {"build": _build, "show": _show}[args.command](args)
    except (ValueError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
        print(f"ladic-data {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
