"""Ahead-of-time TPU fit of a config, compiled on this machine: see ``--help`` and ladic_jax/aot.py.

  python scripts/aot_check.py --config configs/ladic_coco.py --topology v5e:4x4
"""

from ladic_jax.cli.aot_check import main

if __name__ == "__main__":
    main()
