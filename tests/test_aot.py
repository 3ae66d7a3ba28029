"""Ahead-of-time TPU fit (ladic_jax/aot.py, scripts/aot_check.py) on this CPU: the tiny LaDiC config
compiled for a 4-chip v5e slice with libtpu (data=2 x fsdp=2, so that parameters really are split).
Its figures are held against closed-form counts from the model's parameter shapes and the config
(parameter and Adam bytes per chip; dense-layer flops of the diffuser per token), and configs that
cannot fit or cannot run must fail naming the config, the topology and the excess.

Compiling the real train step for a TPU costs most of this file's ~50 s, so it is compiled once."""

import math
import os
import re
import sys

import pytest

from ladic_jax import aot

if not aot.libtpu_available():
    if os.environ.get("CI"):  # in CI the tpu extra is installed (scripts/setup_env.sh): never skip there
        raise ImportError("libtpu is missing: scripts/setup_env.sh installs the tpu extra for tests/test_aot.py")
    pytest.skip("libtpu is not installed: the tpu extra (pip install -e '.[tpu]') provides it; "
                "scripts/setup_env.sh installs it", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "training"))
from tiny_setup import REPO, make_tiny_config  # noqa: E402

from ladic_jax import trainer  # noqa: E402
from ladic_jax.cli import aot_check  # noqa: E402

jax = trainer.jax
TOPOLOGY = "v5e:2x2"
FSDP = 2
# AOT reads no data: the tiny config's dataset directory need not exist. It evaluates at the end of
# training, so the sampler is checked with the optimizer state resident.
OVERRIDES = ["eval.at_end=True"]


def _tiny(*overrides):
    cfg = make_tiny_config("/nonexistent", OVERRIDES + list(overrides))
    with cfg.unlocked():
        cfg.mesh = [("data", -1), ("fsdp", FSDP), ("model", 1)]
    return cfg


@pytest.fixture(scope="module")
def checked():
    cfg = _tiny()
    report = aot.check(cfg, TOPOLOGY, config_name="tiny")
    _, devices = aot.topology_devices(TOPOLOGY)
    params = trainer.skeleton(aot.offline_config(cfg)[0], devices).abstract_state["params"]
    shapes = {trainer.sharding.path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    return report, cfg, shapes


def _param_bytes_per_chip(cfg, shapes, trainable_only=False) -> int:
    """Closed form: float32 parameters, those matching the config's fsdp rule (kernels, embeddings)
    split in FSDP parts, the rest replicated; optionally only those the optimizer trains."""
    fsdp_rule, = [r for r, rule in cfg.sharding_rules if rule == "fsdp"]
    total = 0
    for path, shape in shapes.items():
        if trainable_only and any(re.search(f, path) for f in cfg.optim.frozen):
            continue
        split = re.search(fsdp_rule, path) is not None
        assert not split or any(d % FSDP == 0 for d in shape), path  # the rule can split it
        total += math.prod(shape) * 4 // (FSDP if split else 1)
    return total


def _text_dense_params(shapes) -> int:
    """Weights of the diffuser's dense layers that act on every text position (not the cross-attention
    keys and values, which act on image tokens, nor the time MLP, which acts once per example)."""
    return sum(math.prod(s) for p, s in shapes.items() if p.startswith("diffuser/") and p.endswith("/kernel")
               and not re.search(r"cross_attn/(key|value)/|time_mlp", p))


def test_memory_per_chip_against_parameter_and_adam_bytes(checked):
    report, cfg, shapes = checked
    assert report.fits, aot.format_report(report)
    assert (report.num_devices, report.device_kind) == (4, "TPU v5 lite")
    assert report.mesh == {"data": 2, "fsdp": 2, "model": 1}
    train, sample = report.programs
    assert (train.name, sample.name) == ("train step", "sampler")
    for p in (train, sample):
        assert p.limit_bytes == aot.CHIPS["v5e"].xla_limit_bytes
        m = p.memory
        assert m.total == m.arguments + m.outputs - m.aliased + m.temporaries + m.generated_code
        assert 0 < p.total_bytes < p.limit_bytes

    params = _param_bytes_per_chip(cfg, shapes)
    adam = 2 * _param_bytes_per_chip(cfg, shapes, trainable_only=True)  # mu and nu of what is trained
    # The state: parameters, Adam moments, and a few scalars (step, rng, Adam's count).
    assert 0 <= report.state_bytes - (params + adam) <= 64
    bsz = cfg.input.batch_size // 4  # one chip's share
    batch = bsz * (cfg.input.image_size ** 2 * 3 * 4 + 2 * cfg.input.max_length * 4)  # image, tokens, mask
    # XLA's arguments hold that, padded to the TPU's tiles by less than half; a program that ignored the
    # fsdp split would need about twice the parameters.
    assert params + adam + batch <= train.memory.arguments <= 1.5 * (params + adam + batch)
    # The new state goes into the donated buffers.
    assert params + adam <= train.memory.aliased <= train.memory.outputs
    images = bsz * cfg.input.image_size ** 2 * 3 * 4
    assert params + images <= sample.memory.arguments <= 1.5 * (params + images)
    assert sample.memory.aliased == 0
    # Evaluation inside training keeps the Adam state in HBM beside the sampler.
    assert 0 <= sample.resident_bytes - adam <= 64
    assert sample.total_bytes == sample.memory.total + sample.resident_bytes


def test_flops_per_chip_against_dense_layer_count(checked):
    report, cfg, shapes = checked
    train, sample = report.programs
    tokens = cfg.input.batch_size // 4 * cfg.input.max_length  # one chip's text positions
    dense = 2 * _text_dense_params(shapes) * tokens  # one diffuser forward pass over them
    # Sampler: every denoising step runs the diffuser twice (with and without the image: guidance 1).
    # The rest (attention scores, the image encoder once, the LM head at the end) adds less than 60%.
    # XLA counts a loop body once: a report that did not correct for it would show about 1/5 of this;
    # one that counted all 4 chips, 4 times as much.
    assert (cfg.sampler.steps, cfg.sampler.guidance) == (5, 1.0) and sample.detail == "5 steps"
    assert 1.0 <= sample.flops / (cfg.sampler.steps * 2 * dense) <= 1.6
    # Train step: at least forward and backward of the diffuser (3 forward passes' worth). On top come
    # the self-conditioning pass, the text encoder and decoder, the image encoder and AdamW: together less
    # than as much again as the diffuser's dense layers (all 4 chips' count would be above 10x).
    assert 1.0 <= train.flops / (3 * dense) <= 4.0


def test_indivisible_eval_batch_is_a_problem_naming_the_field():
    report = aot.check(_tiny("input.eval_batch_size=6"), TOPOLOGY, config_name="tiny", programs=["sampler"])
    (p,) = report.programs
    assert not report.fits and p.memory is None
    assert "config.input.eval_batch_size=6" in p.problem and TOPOLOGY in p.problem
    assert "use a multiple of 4, e.g. 4 or 8" in p.problem
    assert aot.verdict(report).startswith("DOES NOT FIT: tiny on v5e:2x2: the sampler could not be checked")


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
    x = jax.ShapeDtypeStruct((50000, 50000), "float32", sharding=trainer.sharding.replicated(mesh))
    fit = aot.ProgramFit("matmul", 1, aot.CHIPS["v5e"].xla_limit_bytes)
    assert aot.compile_program(jax.jit(lambda a: (a @ a) @ a), (x,), fit) is None
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


def test_cli_bad_topology_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        aot_check.main(["--config", os.path.join(REPO, "configs/ladic_coco.py") + ":runlocal",
                        "--topology", "v5e:16"])
    assert e.value.code == 2
    assert "'v5e:16'" in capsys.readouterr().err


def test_cli_help_explains_topologies_and_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        aot_check.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--topology", "v5e:4x4", "v4:2x2x2", "megacore", "Exit status", "--config.optim.lr"):
        assert text in out


def test_autoregressive_captioner_compiles_and_counts_every_decoding_step():
    """The coca family (tiny configs/coca_shapes.py) on the same slice: both programs fit, and the sampler's
    flops count its decoding loop once per step: each of the 31 steps runs the decoder's dense layers on one
    position per image (the image tower and the cross-attention keys/values run once)."""
    from tiny_setup import make_tiny_coca_config
    cfg = make_tiny_coca_config("/nonexistent", ["eval.at_end=True"])
    with cfg.unlocked():
        cfg.mesh = [("data", -1), ("fsdp", FSDP), ("model", 1)]
    report = aot.check(cfg, TOPOLOGY, config_name="tiny coca")
    assert report.fits, aot.format_report(report)
    _, devices = aot.topology_devices(TOPOLOGY)
    params = trainer.skeleton(aot.offline_config(cfg)[0], devices).abstract_state["params"]
    shapes = {trainer.sharding.path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    per_position = sum(math.prod(s) for p, s in shapes.items() if p.startswith("decoder/") and p.endswith("/kernel")
                       and not re.search(r"cross_attn/(key|value)/", p))
    rows = cfg.input.batch_size // 4
    _, sample = report.programs
    assert sample.detail == f"{cfg.sampler.steps} steps" and cfg.sampler.steps == 31
    decoding = 2 * per_position * rows * cfg.sampler.steps
    # On top: attention over the cache, the image tower once; counted once instead of per step it would be ~1/31.
    assert 1.0 <= sample.flops / decoding <= 3.0, sample.flops / decoding


@pytest.mark.parametrize("spec", ["configs/clip_diffusionlm_flickr.py:runlocal", "configs/prefix_diffusion_coco.py:runlocal"])
def test_word_diffusion_paper_configs_compile_for_a_tpu_slice(spec):
    """The CLIP-conditioned word-embedding families (their paper configs' runlocal variants) compile for the
    slice: train step and sampler both fit, the sampler's loop counted at its steps."""
    from ladic_jax import config as config_lib
    cfg = config_lib.load_config(os.path.join(REPO, spec))
    config_lib.apply_overrides(cfg, OVERRIDES)
    with cfg.unlocked():
        cfg.mesh = [("data", -1), ("fsdp", FSDP), ("model", 1)]
    report = aot.check(cfg, TOPOLOGY, config_name=spec)
    assert report.fits, aot.format_report(report)
    train, sample = report.programs
    assert sample.detail == f"{cfg.sampler.steps} steps" and sample.flops > 0 and train.flops > 0


def test_roofline_estimates_and_the_paper_run_length():
    """One call's estimate is the larger of flops at the chip's peak and bytes at its HBM bandwidth; the paper
    config's run is 60 epochs of COCO's 113,287 train+restval images at batch 512; its test split 5,000."""
    from ladic_jax import config as config_lib

    chip = aot.CHIPS["v5e"]
    train = aot.ProgramFit("train step", 512, chip.xla_limit_bytes, flops=0.5 * 197e12, bytes_accessed=0.2 * 819e9)
    assert train.roofline_seconds(chip) == pytest.approx(0.5)          # compute-bound
    sampler = aot.ProgramFit("sampler", 512, chip.xla_limit_bytes, flops=0.1 * 197e12, bytes_accessed=3 * 819e9,
                             detail="30 steps")
    assert sampler.roofline_seconds(chip) == pytest.approx(3.0)        # memory-bound
    report = aot.Report("ladic_coco", "v5e:4x4", chip, 16, "TPU v5 lite", {"data": 16}, 0, [train, sampler], [])
    aot._run_length(report, config_lib.load_config(os.path.join(REPO, "configs/ladic_coco.py")))
    assert report.train_steps == math.ceil(60 * 113_287 / 512) == 13_276 and report.eval_images == 5_000
    training, captioning = report.estimates()
    assert training.startswith("training: 13,276 steps (60 epochs of 113,287 images at batch 512) x 0.5 s = 110.6 min")
    assert captioning.startswith("captioning the 5,000 evaluation images: 10 call(s) of 512 (30 steps) x 3 s")
    assert "estimates (roofline" in aot.format_report(report)
