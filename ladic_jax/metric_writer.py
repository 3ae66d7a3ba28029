"""Training metrics: TensorBoard scalars, a JSON-lines file and a progress line, from process 0 only."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard events in ``WORKDIR/tb``; no-op off process 0."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(path, "a", buffering=1)
        if self._jsonl.tell() and not _ends_with_newline(path):  # a run killed mid-line: start afresh
            self._jsonl.write("\n")
        if tensorboard:
            from flax.metrics import tensorboard as tb  # imports TF lazily
            self._tb = tb.SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.active:
            return
        record = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.scalar(prefix + k, float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _jsonable(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class Progress:
    """A progress line: step, steps/s, examples/s, ETA and the latest metrics."""

    def __init__(self, total_steps: int, first_step: int, examples_per_step: int, stream=sys.stdout):
        self.total = total_steps
        self.examples_per_step = examples_per_step
        self.stream = stream
        self._t0 = time.perf_counter()
        self._step0 = first_step
        self._last_t = self._t0
        self._last_step = first_step

    def update(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        rate = (step - self._last_step) / dt
        overall = (step - self._step0) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / overall if overall > 0 else float("inf")
        self._last_t, self._last_step = now, step
        if jax.process_index() == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"[train] step {step}/{self.total} {100.0 * step / self.total:5.1f}% | {rate:.2f} steps/s "
                  f"{rate * self.examples_per_step:.1f} ex/s | ETA {_fmt_time(eta)} | {shown}",
                  file=self.stream, flush=True)
        return {"steps_per_sec": rate, "examples_per_sec": rate * self.examples_per_step}


def _fmt_time(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
