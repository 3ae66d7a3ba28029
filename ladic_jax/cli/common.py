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
    """Ends the command with one line on stderr, ``error: MSG``, and exit status ``code`` (2: a user error,
    bad flag, path, config or missing input; 1: a failure while running)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# ---- checks run before anything slow (building, loading or compiling a model), so that a missing input stops
# a command in its first seconds with one line naming it


def check_tokenizer(config):
    """Loads ``config.input.tokenizer`` (the model loads it again when it needs it); returns it."""
    from ladic_jax.data import text
    try:
        return text.load_tokenizer(config.input.tokenizer)
    except text.TokenizerError as e:
        fail(str(e))


def check_dataset(input_cfg) -> None:
    """``config.input.data_dir`` exists and holds the prepared ``config.input.dataset``."""
    from etils import epath

    from ladic_jax.data import datasets, pipeline
    data_dir = input_cfg.get("data_dir")
    if data_dir and not epath.Path(data_dir).is_dir():  # local or gs://
        fail(f"config.input.data_dir={data_dir!r} is not a directory: give the TFDS data directory that holds "
             f"{input_cfg.dataset} with --config.input.data_dir=DIR (built by "
             f"{datasets.build_hint(input_cfg.dataset).strip('`')})")
    try:
        pipeline.get_builder(input_cfg)
    except ValueError as e:
        fail(str(e))
