"""`ladic-data`: build the project's captioning datasets and look at any captioning dataset.

    ladic-data build shapes_captions [--config default|long|tiny] --data_dir DIR
    ladic-data build karpathy_captions --config coco|flickr8k|flickr30k|flickr30k+8k --manual_dir SRC --data_dir DIR
    ladic-data build cub_captions [--config default|unseen_classes] --manual_dir SRC --data_dir DIR
    ladic-data show --dataset shapes_captions --split test --data_dir DIR --out sheet.png [--num 16]
                    [--captions WORKDIR/eval/step_N_captions.jsonl]

`build` generates `shapes_captions` (nothing is downloaded), or converts a real dataset from the files in
SRC (local or gs://; layouts in the README, section "Real datasets") into TFRecords, and prints where it went,
the split sizes and how long it took.
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

from ladic_jax.data import datasets

_CONFIGS_HELP = ("shapes_captions: default (64px, 1-3 shapes, 5000/500/500 images), long (128px, 4-6 shapes, "
                 "paragraph captions), tiny (48/16/16 default images); karpathy_captions: coco, flickr8k, "
                 "flickr30k, flickr30k+8k; cub_captions: default (CUB's split), unseen_classes (Reed et al.'s "
                 "class split). Default: the dataset's first")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladic-data",
        description="Build the project's captioning datasets (synthetic shapes_captions; COCO, Flickr and CUB "
                    "from local files) and render sheets of images with their captions from any TFDS "
                    "captioning dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  ladic-data build shapes_captions --data_dir ~/tensorflow_datasets\n"
               "  ladic-data build shapes_captions --config long --data_dir ~/tensorflow_datasets\n"
               "  ladic-data build karpathy_captions --config coco --manual_dir /data/coco "
               "--data_dir gs://bucket/tfds\n"
               "  ladic-data build cub_captions --manual_dir /data/cub --data_dir ~/tensorflow_datasets\n"
               "  ladic-data show --dataset shapes_captions --split test --data_dir ~/tensorflow_datasets "
               "--out sheet.png\n")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,show}")

    build = commands.add_parser(
        "build", help="build a dataset into a TFDS data dir",
        description="Build DATASET into DATA_DIR/DATASET/CONFIG/VERSION: shapes_captions is generated "
                    "(coloured shapes with five template captions each); karpathy_captions and cub_captions "
                    "are read from the dataset's own files in MANUAL_DIR. Reuses the data if it is already "
                    "there.")
    build.add_argument("dataset", choices=sorted(datasets.PROJECT_BUILDERS), help="dataset to build")
    build.add_argument("--config", default=None, help=_CONFIGS_HELP)
    build.add_argument("--manual_dir", default=None,
                       help="where the dataset's files are (local or gs://), for karpathy_captions and "
                            "cub_captions")
    build.add_argument("--data_dir", required=True, help="TFDS data directory to write into")

    show = commands.add_parser(
        "show", help="render a sheet of images with their captions",
        description="Render the first NUM examples of a split of a prepared TFDS captioning dataset "
                    "(features image and captions/text, like coco_captions) as a PNG grid.")
    show.add_argument("--dataset", required=True,
                      help="TFDS name, optionally with config: shapes_captions, shapes_captions/long, "
                           "karpathy_captions/coco, cub_captions, coco_captions")
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
    manual_dir = None if args.manual_dir is None else os.path.expanduser(args.manual_dir)
    report = datasets.build(args.dataset, os.path.expanduser(args.data_dir), args.config, manual_dir)
    sizes = ", ".join(f"{k} {v}" for k, v in report.split_sizes.items())
    verb = "already present, reused" if report.reused else "built"
    print(f"{args.dataset}/{report.config}: {verb} in {report.seconds:.1f} s ({sizes} images)")
    print(f"data: {report.path}")


def _show(args: argparse.Namespace) -> None:
    from ladic_jax.data import caption_sheet

    from etils import epath

    data_dir = os.path.expanduser(args.data_dir)
    if not epath.Path(data_dir).is_dir():  # Local or gs://.
        raise FileNotFoundError(f"--data_dir {args.data_dir!r} is not a directory")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out {args.out!r}: directory {out_dir!r} does not exist")
    sheet = caption_sheet.write_dataset_sheet(args.dataset, args.split, data_dir, args.out, num=args.num,
                                              columns=args.columns, tile=args.tile,
                                              max_captions=args.num_refs, generated_path=args.captions)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}px) from {args.dataset} split {args.split}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ladic-data` console script; returns the process exit code (2 on a user error: one
    line on stderr naming it)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "build" and args.config is not None and args.config not in datasets.config_names(args.dataset):
        parser.error(f"argument --config: {args.config!r} is not a config of {args.dataset}; choose one of "
                     f"{datasets.config_names(args.dataset)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's start-up chatter out of the way.
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    try:
        {"build": _build, "show": _show}[args.command](args)
    except (ValueError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
        print(f"ladic-data {args.command}: error: {e}", file=sys.stderr)
        return 2  # a user error: a missing or unprepared dataset, a bad path or value
    return 0


if __name__ == "__main__":
    sys.exit(main())
