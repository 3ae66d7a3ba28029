"""Runs ladic-train in ONE process that sees exactly the global batches of an N-process run: the
reference for tests/training/test_multiprocess.py.

Each process of a real N-process run reads its own slice of the data (`tfds.even_splits`) and the global
batch is the processes' local batches one after the other. Here the training and evaluation iterators
are replaced by ones that read the N slices and concatenate their batches in process order; everything
else (trainer, checkpoints, evaluator, metrics) is the real code.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python emulated_processes.py N [ladic-train flags]
"""

import sys

import numpy as np

from ladic_jax.cli import train as train_cli
from ladic_jax.data import pipeline


def _merged(make, n):
    def make_all(input_cfg, tokenizer=None, **kw):
        its = [make(input_cfg, tokenizer, **kw, process_index=p, process_count=n) for p in range(n)]
        for parts in zip(*its):
            yield {k: (np.concatenate([b[k] for b in parts]) if isinstance(parts[0][k], np.ndarray)
                       else [x for b in parts for x in b[k]]) for k in parts[0]}
    return make_all


def main():
    n = int(sys.argv[1])
    pipeline.make_train_iterator = _merged(pipeline.make_train_iterator, n)
    pipeline.make_eval_iterator = _merged(pipeline.make_eval_iterator, n)
    train_cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
