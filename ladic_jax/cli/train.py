"""ladic-train: train (or resume) a captioner from a config file and evaluate it."""

from __future__ import annotations

import argparse

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
    from ladic_jax import trainer
    from ladic_jax.checkpoint import CheckpointError
    try:
        trainer.train_and_evaluate(cfg, args.workdir)
    except (CheckpointError, trainer.NonFiniteError) as e:
        common.fail(str(e), code=1)


if __name__ == "__main__":
    main()
