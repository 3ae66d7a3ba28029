"""Ahead-of-time TPU fit (ladic_jax/aot.py, scripts/aot_check.py) on this CPU: the tiny LaDiC config
compiled for small TPU topologies with libtpu; its figures are checked against each other and against
the train state's per-chip size computed here from the shardings, and a config that cannot fit fails
naming the config, the topology and the excess."""

import math
import os
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: the tpu extra (pip install -e '.[tpu]') "
                                     "provides it; scripts/setup_env.sh installs it")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "training"))
from tiny_setup import REPO, make_tiny_config  # noqa: E402

from ladic_jax import aot, trainer  # noqa: E402
from ladic_jax.cli import aot_check  # noqa: E402

TOPOLOGY = "v5e:2x2"
# AOT reads no data: the tiny config's dataset directory need not exist. It evaluates at the end of
# training, so the sampler is checked with the optimizer state resident.
OVERRIDES = ["eval.at_end=True"]


def _tiny(*overrides):
    return make_tiny_config("/nonexistent", OVERRIDES + list(overrides))


def _device_bytes(tree, device) -> int:
    """Bytes of `device`'s piece of every leaf, from the index ranges its sharding assigns it."""
    total = 0
    for leaf in trainer.jax.tree.leaves(tree):
        index = leaf.sharding.devices_indices_map(leaf.shape)[device]
        dims = [len(range(*s.indices(n))) for s, n in zip(index, leaf.shape)]
        total += math.prod(dims) * leaf.dtype.itemsize
    return total


@pytest.fixture(scope="module")
def checked():
    report = aot.check(_tiny(), TOPOLOGY, config_name="tiny")
    _, devices = aot.topology_devices(TOPOLOGY)
    sk = trainer.skeleton(aot.offline_config(_tiny())[0], devices)
    return report, sk, devices


def test_tiny_config_fits_with_consistent_figures(checked):
    report, sk, devices = checked
    assert report.fits, aot.format_report(report)
    assert (report.num_devices, report.device_kind) == (4, "TPU v5 lite")
    assert report.mesh == {"data": 4, "fsdp": 1, "model": 1}
    train, sample = report.programs
    assert (train.name, sample.name) == ("train step", "sampler")
    assert train.limit_bytes == sample.limit_bytes == aot.CHIPS["v5e"].xla_limit_bytes
    for p in (train, sample):
        m = p.memory
        assert min(m.arguments, m.outputs, m.temporaries, m.generated_code) > 0
        assert m.total == m.arguments + m.outputs - m.aliased + m.temporaries + m.generated_code
        assert p.flops > 0
        assert 0 < p.total_bytes < p.limit_bytes

    state = _device_bytes(sk.abstract_state, devices[0])
    params = _device_bytes(sk.abstract_state["params"], devices[0])
    opt_state = _device_bytes(sk.abstract_state["opt_state"], devices[0])
    batch = trainer.dummy_batch(sk.family.config, 8 // 4)  # one chip's share of the batch of 8
    batch_bytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in batch.values())
    assert report.state_bytes == state
    # The train step takes the whole state and its batch share and returns the new state into the
    # donated buffers; the sampler takes every parameter and its share of the images.
    assert train.memory.arguments >= state + batch_bytes
    assert train.memory.outputs >= state
    assert state <= train.memory.aliased <= min(train.memory.arguments, train.memory.outputs)
    image_bytes = math.prod(batch["image"].shape) * 4
    assert sample.memory.arguments >= params + image_bytes
    assert sample.memory.aliased == 0
    # Evaluation inside training keeps the optimizer state in HBM beside the sampler.
    assert sample.resident_bytes == opt_state > 0
    assert sample.total_bytes == sample.memory.total + opt_state


def test_flops_scale_with_batch_and_sampling_steps(checked):
    report, _, _ = checked
    base = report.programs[1].flops
    double_batch = aot.check(_tiny("input.eval_batch_size=16"), TOPOLOGY, programs=["sampler"]).programs[0]
    assert 1.8 < double_batch.flops / base <= 2.05
    # XLA counts a loop body once; the report counts every denoising step of the loop.
    more_steps = aot.check(_tiny("sampler.steps=10"), TOPOLOGY, programs=["sampler"]).programs[0]
    assert more_steps.memory.temporaries == pytest.approx(report.programs[1].memory.temporaries, rel=0.1)
    assert more_steps.flops / base > 1.5


def test_indivisible_eval_batch_is_a_problem_naming_the_field():
    report = aot.check(_tiny("input.eval_batch_size=6"), TOPOLOGY, config_name="tiny", programs=["sampler"])
    (p,) = report.programs
    assert not report.fits and p.memory is None
    assert "config.input.eval_batch_size=6" in p.problem and TOPOLOGY in p.problem
    assert "multiple of 4" in p.problem
    assert aot.verdict(report).startswith("DOES NOT FIT: tiny on v5e:2x2")


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "unknown TPU generation 'v9'"),
    ("v5e-16", "expected GENERATION:AxB"),
    ("v5e:3x5", "libtpu cannot describe it"),
])
def test_bad_topology_is_named(topology, message):
    with pytest.raises(aot.AotError, match=message) as e:
        aot.topology_devices(topology)
    assert repr(topology) in str(e.value)


def test_xla_out_of_memory_is_reported_with_its_figures():
    # A 50000 x 50000 float32 product on one v5e chip: 9.3 GiB per matrix, XLA refuses to compile it.
    _, devices = aot.topology_devices("v5e:1x1")
    mesh = trainer.sharding.make_mesh([("data", -1)], devices)
    x = trainer.jax.ShapeDtypeStruct((50000, 50000), "float32", sharding=trainer.sharding.replicated(mesh))
    fit = aot.ProgramFit("matmul", 1, aot.CHIPS["v5e"].xla_limit_bytes)
    assert aot.compile_program(trainer.jax.jit(lambda a: (a @ a) @ a), (x,), fit) is None
    assert "RESOURCE_EXHAUSTED" in fit.problem and not fit.fits
    assert fit.limit_bytes == aot.CHIPS["v5e"].xla_limit_bytes  # XLA's own "available HBM"
    assert fit.needed_bytes > 2 * 50000 ** 2 * 4 and fit.over_bytes == fit.needed_bytes - fit.limit_bytes


def test_cli_fails_naming_config_topology_and_excess(capsys):
    # One v5e chip and a diffuser 16384 wide: its parameters alone are about 32 GiB.
    spec = os.path.join(REPO, "configs/ladic_coco.py") + ":runlocal"
    with pytest.raises(SystemExit) as e:
        aot_check.main(["--config", spec, "--topology", "v5e:1x1", "--config.model.diffuser.overrides.width=16384",
                        "--config.model.diffuser.overrides.mlp_dim=65536"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out.count("NO (over by") == 2
    assert "the train state (parameters, optimizer state) and the batch alone need" in out
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: DOES NOT FIT: {spec} on v5e:1x1: the train step needs ")
    assert "GiB over the 15.75 GiB XLA allows on a v5e chip; the sampler needs " in last


def test_cli_help_explains_topologies_and_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        aot_check.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--topology", "v5e:4x4", "v4:2x2x2", "megacore", "Exit status", "--config.optim.lr"):
        assert text in out
