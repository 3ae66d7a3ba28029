"""Multi-process runs: `config.distributed` / environment settings, and two real processes (one CPU
device each, loopback coordinator, gloo collectives) trained, preempted, resumed and evaluated.

The reference is ONE process with two CPU devices that sees exactly the global batches of the two-process
run (emulated_processes.py): the same program on the same 2-device mesh, so the only difference is that
the collectives go through gloo between processes instead of within one. Sums over two participants do
not depend on their order, so losses, captions and scores are expected to be equal exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

import launch
from ladic_jax import distributed
from ladic_jax.config import ConfigError
from ladic_jax.evaluation import report
from tiny_setup import make_tiny_config

# ---------------------------------------------------------------------------------------------- settings


def _cfg(**fields):
    cfg = make_tiny_config("unused")
    with cfg.unlocked():
        cfg.distributed.update(fields)
    return cfg


def test_single_process_unless_told_otherwise():
    assert distributed.settings(_cfg(), environ={}) is None
    assert distributed.settings(_cfg(num_processes=1), environ={}) is None
    assert distributed.initialize(_cfg(), environ={}) is False  # nothing to do (JAX may already be in use)


def test_settings_from_environment_and_config_which_wins():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    s = distributed.settings(_cfg(), environ=env)
    assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("10.0.0.1:1234", 4, 3)
    s = distributed.settings(_cfg(coordinator_address="host:99", process_id=1), environ=env)
    assert (s["coordinator_address"], s["num_processes"], s["process_id"]) == ("host:99", 4, 1)


@pytest.mark.parametrize("fields,env,message", [
    (dict(coordinator_address="localhost"), {}, "config.distributed.coordinator_address must be 'host:port'"),
    (dict(num_processes=0), {}, "config.distributed.num_processes must be an integer >= 1"),
    (dict(num_processes=2, process_id=2), {}, r"config.distributed.process_id must be an integer in \[0, "),
    (dict(coordinator_address="h:1", num_processes=2), {}, r"not set: config.distributed.process_id \(or "
                                                          "JAX_PROCESS_ID\\)"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "not set: config.distributed.num_processes"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "environment variable JAX_NUM_PROCESSES must be an integer"),
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, r"process id 5 .* must be in \[0, 2\)"),
    (dict(nodes=2), {}, r"config.distributed has unknown field\(s\) \['nodes'\]"),
])
def test_bad_settings_name_the_field(fields, env, message):
    cfg = make_tiny_config("unused")
    with cfg.unlocked():
        for k, v in fields.items():
            cfg.distributed[k] = v
    with pytest.raises(ConfigError, match=message):
        distributed.settings(cfg, environ=env)


def test_asking_for_processes_once_jax_runs_is_an_error():
    import jax
    jax.devices()  # the backend is up
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(RuntimeError, match="call ladic_jax.distributed.initialize\\(config\\) before any other"):
        distributed.initialize(_cfg(), environ=env)


# -------------------------------------------------------------------------------- two real processes

STEPS = 12
EVAL = ["--config.eval.at_end=True", "--config.eval.limit=8", "--config.eval.sampling_steps=(2,)",
        "--config.sampler.steps=2", "--config.input.eval_batch_size=8"]


def _flags(workdir, data_dir):
    return ["--workdir", workdir, f"--config.input.data_dir={data_dir}", f"--config.total_steps={STEPS}",
            "--config.log_every=1", "--config.checkpoint.every_steps=4", "--config.input.batch_size=8",
            '--config.mesh=[("data", 1), ("fsdp", -1), ("model", 1)]', *EVAL]


def _launch_pair(workdir, data_dir, cache, logs, via):
    """Processes 0 and 1 of a run, told who they are by environment variables or by config flags."""
    port = launch.free_port()
    procs = []
    for i in range(2):
        extra = {}
        flags = []
        if via == "env":
            extra.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        else:
            flags = [f"--config.distributed.coordinator_address=localhost:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        procs.append(launch.Proc([*launch.TRAIN, "--config", launch.CONFIG, *_flags(workdir, data_dir), *flags],
                                 launch.env(cache, devices=1, **extra), f"{logs}_p{i}"))
    return procs


def _captions(workdir, step):
    return {r["image_id"]: r["caption"] for r in report.read_captions(workdir, step)}


def test_two_processes_train_stop_resume_and_evaluate_like_one(tiny_data_dir, compile_cache, tmp_path):
    workdir, ckdir = str(tmp_path / "two"), str(tmp_path / "two" / "checkpoints")
    # 1. Two processes train; process 1 alone gets SIGINT (as Ctrl-C on one host): both stop at one step.
    procs = _launch_pair(workdir, tiny_data_dir, compile_cache, str(tmp_path / "phase1"), via="env")
    try:
        procs[0].wait_until(lambda: launch.last_step(workdir) >= 2, "step 2")
        procs[1].signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            p.close()
    assert codes == [0, 0], [p.err[-3000:] for p in procs]
    stopped = launch.last_step(workdir)
    assert stopped < STEPS, "the run ended before the signal arrived; nothing was tested"
    for p in procs:
        assert f"every process stops at step {stopped}" in p.out and f"stopped at step {stopped}" in p.out
    assert "received SIGINT" in procs[1].out
    assert sorted(os.listdir(os.path.join(ckdir, str(stopped), "state")))[-2:] == ["ocdbt.process_0",
                                                                                   "ocdbt.process_1"]
    # 2. Both restart (settings from config flags this time), resume, finish and evaluate.
    procs = _launch_pair(workdir, tiny_data_dir, compile_cache, str(tmp_path / "phase2"), via="config")
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            p.close()
    assert codes == [0, 0], [p.err[-3000:] for p in procs]
    assert f"resumed from {ckdir}/{stopped}" in procs[0].out

    # The reference: one process, two devices, the same global batches, uninterrupted.
    ref = str(tmp_path / "one")
    launch.run([sys.executable, os.path.join(launch.HERE, "emulated_processes.py"), "2", "--config",
                launch.CONFIG, *_flags(ref, tiny_data_dir)], launch.env(compile_cache, devices=2), ref)

    got, want = launch.losses(workdir), launch.losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in got.values()), "a step was logged twice: metrics must come from process 0"
    assert got == want
    # Bad-record counts are summed over the processes: every step counts the global batch.
    counted = [{r["step"]: r["data/examples"] for r in launch.metrics(w) if "data/examples" in r}
               for w in (workdir, ref)]
    assert counted[0] == counted[1] and set(counted[0].values()) == {8}, counted
    assert len(_captions(workdir, STEPS)) == 8 and _captions(workdir, STEPS) == _captions(ref, STEPS)
    scores = [json.loads(report.metrics_path(w, STEPS).read_text()) for w in (workdir, ref)]
    for key in ("num_images", "bleu_4", "cider", "meteor", "rouge_l", "dist_1"):
        assert scores[0][key] == scores[1][key], key
