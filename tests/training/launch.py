"""Launching real training processes for the preemption, fault and multi-process tests.

Every process gets this checkout first on PYTHONPATH, CPU devices only, and a persistent compilation cache
shared by the tests of a session (compiling the tiny model's steps costs more than running them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, "tiny_config.py")
TRAIN = [sys.executable, "-m", "ladic_jax.cli.train"]  # then "--config", CONFIG, ...
FAULTY = [sys.executable, os.path.join(HERE, "fault_injection.py")]  # then the fault, then the same


def env(cache_dir: str, devices: int = 1, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    e.update(PYTHONPATH=os.pathsep.join([REPO, HERE, e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
             JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONUNBUFFERED="1", **extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its output in files (``out``, ``err``), killed at ``close()`` if still alive."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_prefix: str):
        self.out_path, self.err_path = log_prefix + ".out", log_prefix + ".err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.popen = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=self._err, cwd=REPO)

    @property
    def out(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    @property
    def err(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def wait_until(self, condition, what: str, timeout: float = 900) -> None:
        """Polls ``condition()`` until it holds; fails if the process ends first (a hang guard, not a timing
        assertion: the timeout only stops a stuck test)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                raise AssertionError(f"process ended (status {self.popen.returncode}) before {what}:\n"
                                     f"{self.out[-3000:]}\n{self.err[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()
        self._out.close()
        self._err.close()


def run(cmd: list[str], env: dict[str, str], log_prefix: str, timeout: float = 900) -> Proc:
    """Runs to the end and checks the exit status is 0."""
    p = Proc(cmd, env, log_prefix)
    try:
        code = p.wait(timeout)
    finally:
        p.close()
    assert code == 0, f"{cmd} exited with {code}:\n{p.out[-3000:]}\n{p.err[-3000:]}"
    return p


def metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the tail of a line cut by kill -9 (or a line being written)
                pass
    return out


def losses(workdir: str) -> dict[int, list[float]]:
    """Every logged training loss by step (a step appears more than once when it was trained again)."""
    out: dict[int, list[float]] = {}
    for r in metrics(workdir):
        if "train/loss" in r:
            out.setdefault(r["step"], []).append(r["train/loss"])
    return out


def last_step(workdir: str) -> int:
    return max(losses(workdir), default=0)


def checkpoint_dirs(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []
