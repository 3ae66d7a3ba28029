"""What the command-line tools share: config flags with big_vision-style overrides, logging set-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ladic_jax import config as config_lib

OVERRIDE_HELP = ("Any config field can be overridden after the other flags, e.g. "
                 "--config.optim.lr=1e-4 --config.input.data_dir=data")


def add_config_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, metavar="FILE.py[:ARGS]",
                        help="config file with get_config(arg); variants after a colon, e.g. "
                             "configs/ladic_shapes.py:runlocal,steps=10")


def parse(parser: argparse.ArgumentParser, argv=None):
    """Parses flags; returns (args, overrides) where overrides are 'a.b=value' strings."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" not in key:
                try:
                    key = f"{key}={next(it)}"
                except StopIteration:
                    parser.error(f"{a} needs a value")
            overrides.append(key)
        else:
            rest.append(a)
    return parser.parse_args(rest), overrides


def load(spec: str, overrides: list[str]):
    cfg = config_lib.load_config(spec)
    config_lib.apply_overrides(cfg, overrides)
    return cfg


def setup_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
