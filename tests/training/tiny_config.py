"""The tiny LaDiC config of tiny_setup.py as a config file, for tests that launch the real CLI:

  python -m ladic_jax.cli.train --config tests/training/tiny_config.py --workdir W \
      --config.input.data_dir=DATA --config.total_steps=8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_setup import make_tiny_config  # noqa: E402


def get_config(arg=None):
    return make_tiny_config("unset: pass --config.input.data_dir")
