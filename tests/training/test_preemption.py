"""Preemption, exact resume and checkpoint faults, on real `python -m ladic_jax.cli.train` processes.

One run is taken through everything a long job meets, and its losses are compared, bit for bit, with an
uninterrupted run of the same config:

  1. SIGTERM while training: a checkpoint at the step it stopped, exit status 0.
  2. restart, then `kill -9` in the middle of an asynchronous checkpoint save (held just before orbax's
     final rename, see fault_injection.py): only a temporary directory is left.
  3. the newest complete checkpoint is really truncated on disk; the restart reports it by path, falls
     back to the previous one, removes the killed save's temporary directory and trains to the end.

Every step trained more than once (after the kill and the fallback) must give the same loss each time.
A full disk on save is a separate run. (Non-finite losses: test_trainer.py; grad norm: test_checkpoint.py.)
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess

import pytest

import launch

STEPS, EVERY = 60, 5


def _cmd(workdir, data_dir, *extra, program=launch.TRAIN):
    return [*program, "--config", launch.CONFIG, "--workdir", workdir, f"--config.input.data_dir={data_dir}",
            f"--config.total_steps={STEPS}", "--config.log_every=1", f"--config.checkpoint.every_steps={EVERY}",
            *extra]


@pytest.fixture(scope="module")
def reference(tiny_data_dir, compile_cache, tmp_path_factory):
    """Losses of the uninterrupted run, and the size of one of its checkpoints."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    launch.run(_cmd(workdir, tiny_data_dir), launch.env(compile_cache), workdir)
    got = launch.losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    ckpt = os.path.join(workdir, "checkpoints", str(STEPS))
    size = sum(os.path.getsize(f) for f in glob.glob(ckpt + "/**", recursive=True) if os.path.isfile(f))
    return {s: v[0] for s, v in got.items()}, size


def test_preempted_killed_and_corrupted_run_resumes_with_bit_identical_losses(
        reference, tiny_data_dir, compile_cache, tmp_path):
    want, _ = reference
    workdir, ckdir = str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")
    env = launch.env(compile_cache)

    # 1. SIGTERM once a periodic checkpoint exists (so that there is an older one to fall back to later).
    p = launch.Proc(_cmd(workdir, tiny_data_dir), env, str(tmp_path / "1_sigterm"))
    try:
        p.wait_until(lambda: launch.last_step(workdir) > EVERY, f"step {EVERY + 1}")
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.err[-3000:]
    finally:
        p.close()
    stopped = launch.last_step(workdir)
    assert f"stopped at step {stopped}; checkpoint saved" in p.out
    assert stopped < STEPS, "the run ended before SIGTERM arrived; nothing was tested"
    assert str(stopped) in launch.checkpoint_dirs(workdir)

    # 2. Restart; kill -9 during the next checkpoint save, once its files are written but before the rename.
    p = launch.Proc(_cmd(workdir, tiny_data_dir, program=[*launch.FAULTY, "hang-save-after", str(stopped)]),
                    env, str(tmp_path / "2_kill9"))
    try:
        p.wait_until(lambda: "FAULT hang" in p.out, "the checkpoint save to hang")
        hung_step, tmp_dir = p.out.split("FAULT hang ", 1)[1].split()[:2]
        assert os.path.isdir(tmp_dir) and os.listdir(tmp_dir), "the save wrote nothing before the kill"
        p.signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    finally:
        p.close()
    assert f"resumed from {ckdir}/{stopped}" in p.out
    assert hung_step not in launch.checkpoint_dirs(workdir)  # only the tmp dir: not a checkpoint

    # 3. Truncate the newest complete checkpoint's largest data file; restart and train to the end.
    data_files = glob.glob(os.path.join(ckdir, str(stopped), "state", "ocdbt.process_0", "d", "*"))
    biggest = max(data_files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    previous = max(int(s) for s in launch.checkpoint_dirs(workdir) if s.isdigit() and int(s) < stopped)
    p = launch.run(_cmd(workdir, tiny_data_dir), env, str(tmp_path / "3_resume"))
    assert f"checkpoint {ckdir}/{stopped} is unreadable" in p.err
    assert f"resumed from {ckdir}/{previous}" in p.out
    assert not [d for d in launch.checkpoint_dirs(workdir) if "tmp" in d]  # the killed save's leftovers

    # The whole sequence, every time a step was trained: bit-identical to the uninterrupted run.
    got = launch.losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    retrained = sorted(s for s, v in got.items() if len(v) > 1)
    assert retrained, "no step was trained twice: the fallback to an older checkpoint was not exercised"
    differ = {s: (v, want[s]) for s, v in got.items() if set(v) != {want[s]}}
    assert not differ, f"losses differ from the uninterrupted run at steps {sorted(differ)}: {differ}"


def _mount_tmpfs(path: str, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_disk_full_on_save_stops_the_run_naming_the_checkpoint(reference, tiny_data_dir, compile_cache, tmp_path):
    """A real full disk where a small tmpfs can be mounted (root); else ENOSPC injected into orbax's save."""
    _, ckpt_bytes = reference
    workdir = str(tmp_path / "run")
    ckdir = os.path.join(workdir, "checkpoints")
    mounted = _mount_tmpfs(ckdir, int(ckpt_bytes * 1.5))  # room for the first checkpoint, not the second
    program = launch.TRAIN if mounted else [*launch.FAULTY, "enospc-after", str(EVERY)]
    cmd = _cmd(workdir, tiny_data_dir, program=program)
    try:
        p = launch.Proc(cmd, launch.env(compile_cache), str(tmp_path / "disk_full"))
        try:
            code = p.wait()
        finally:
            p.close()
        assert code == 1, f"exit status {code}:\n{p.err[-3000:]}"
        # (the last "error:" line: tensorstore's threads may still print asyncio tracebacks after it)
        err = [line for line in p.err.splitlines() if line.startswith("error:")][-1]
        assert err.startswith(f"error: saving checkpoint {ckdir}/{2 * EVERY} failed"), err
        assert "No space left on device" in err
        assert err.endswith(f"the newest complete checkpoint is {ckdir}/{EVERY}"), err
        from ladic_jax.checkpoint import Checkpointer
        ck = Checkpointer(ckdir, read_only=True)
        assert ck.all_steps() == [EVERY] and ck.restore_meta(EVERY)["step"] == EVERY
        ck.close()
    finally:
        if mounted:
            subprocess.run(["umount", ckdir], check=True)


def test_signals_stop_at_the_next_step_boundary_and_handlers_are_restored():
    from ladic_jax.trainer import _StopRequest
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with _StopRequest() as stop:
            assert not stop.requested(1)
            os.kill(os.getpid(), sig)
            assert stop.requested(2) and stop.signal == sig
        assert {s: signal.getsignal(s) for s in before} == before
    with _StopRequest():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)


def test_non_finite_grad_norm_stops_naming_the_step_and_the_last_good_checkpoint():
    from ladic_jax import trainer

    class Checkpointer:  # what _check_finite asks of the real one
        closed = False

        def wait(self):
            pass

        def latest_step(self):
            return 40

        def close(self):
            self.closed = True

    ck = Checkpointer()
    trainer._check_finite({"loss": 1.5, "grad_norm": 3.0}, 41, ck)
    with pytest.raises(trainer.NonFiniteError, match=r"^non-finite grad_norm at step 41; stopping; the last "
                                                     r"good checkpoint of step 40 is intact$"):
        trainer._check_finite({"loss": 1.5, "grad_norm": float("nan")}, 41, ck)
    assert ck.closed
