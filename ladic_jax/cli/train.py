"""ladic-train: train (or resume) a captioner from a config file and evaluate it."""

from __future__ import annotations

import argparse
import os

from ladic_jax.cli import common


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="ladic-train", description="Train a diffusion captioner. Resumes from the newest checkpoint in "
        "--workdir if there is one. SIGTERM/Ctrl-C saves a checkpoint and exits. Multi-process runs: one "
        "process per host with --config.distributed.* (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID); see ladic_jax/distributed.py.",
        epilog=common.OVERRIDE_HELP)
    common.add_config_flag(p)
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, eval results")
    args, overrides = common.parse(p, argv)
    common.setup_logging()
    from ladic_jax import config as config_lib
    from ladic_jax import distributed
    try:
        cfg = common.load(args.config, overrides)
        distributed.initialize(cfg)  # before anything else touches JAX
        config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        common.fail(str(e))
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        common.fail(f"--workdir {args.workdir} is a file; give a run directory (new, or one to resume)")
    # What the run reads, checked before the model is built and initialised.
    common.check_tokenizer(cfg)
    common.check_dataset(cfg.input)
    try:
        os.makedirs(args.workdir, exist_ok=True)
    except OSError as e:
        common.fail(f"--workdir {args.workdir}: cannot create the run directory ({e.strerror})")
    from ladic_jax import trainer
    from ladic_jax.checkpoint import CheckpointError
    try:
        trainer.train_and_evaluate(cfg, args.workdir)
    except (CheckpointError, trainer.NonFiniteError) as e:
        common.fail(str(e), code=1)


if __name__ == "__main__":
    main()
