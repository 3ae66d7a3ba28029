"""Runs ladic-train in ONE process that sees exactly the global batches of an N-process run: the
reference for tests/training/test_multiprocess.py.

Each process of a real N-process run reads its own slice of the data (`tfds.even_splits`) and the global
batch is the processes' local batches one after the other. Here the training and evaluation iterators
are replaced by ones that read the N slices and concatenate their batches in process order (and sum
their bad-record counts); everything else (trainer, checkpoints, evaluator, metrics) is the real code.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python emulated_processes.py N [ladic-train flags]
"""

import sys

import numpy as np

from ladic_jax.cli import train as train_cli
from ladic_jax.data import pipeline


def _concat(parts):
    return {k: (np.concatenate([b[k] for b in parts]) if isinstance(parts[0][k], np.ndarray)
                else [x for b in parts for x in b[k]]) for k in parts[0]}


class _MergedTrainStream:
    """The N processes' training streams as one: batches concatenated, bad-record counts summed."""

    def __init__(self, streams):
        self._streams = streams

    def __iter__(self):
        return self

    def __next__(self):
        return _concat([next(s) for s in self._streams])

    def pop_counts(self):
        counts = [s.pop_counts() for s in self._streams]
        return {k: sum(c[k] for c in counts) for k in counts[0]}


def _merged_train(make, n):
    return lambda input_cfg, tokenizer=None, **kw: _MergedTrainStream(
        [make(input_cfg, tokenizer, **kw, process_index=p, process_count=n) for p in range(n)])


def _merged_eval(make, n):
    def make_all(input_cfg, tokenizer=None, **kw):
        its = [make(input_cfg, tokenizer, **kw, process_index=p, process_count=n) for p in range(n)]
        for parts in zip(*its):
            yield _concat(parts)
    return make_all


def main():
    n = int(sys.argv[1])
    pipeline.make_train_iterator = _merged_train(pipeline.make_train_iterator, n)
    pipeline.make_eval_iterator = _merged_eval(pipeline.make_eval_iterator, n)
    train_cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
