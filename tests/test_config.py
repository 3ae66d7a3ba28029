"""Tests of the config library: loading with variants, overrides, absl flags, validation."""

from __future__ import annotations

import os
import textwrap

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from ladic_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = textwrap.dedent('''
    """Test config. Launch: ladic-train --config tests/x.py:runlocal"""
    import ml_collections
    from ladic_jax import config as config_lib

    def get_config(arg=None):
        arg = config_lib.parse_arg(arg, runlocal=False, steps=1000, variant="base", lr=None)
        c = ml_collections.ConfigDict()
        c.variant = arg.variant
        c.optim = ml_collections.ConfigDict(dict(lr=arg.lr if arg.lr is not None else 5e-5,
                                                 steps=arg.steps, warmup=0.1, clip=True))
        c.input = config_lib.input_config(tokenizer="tok", batch_size=8 if arg.runlocal else 512)
        c.mesh = (("data", -1), ("fsdp", 1))
        return c
''')


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "x.py"
    path.write_text(CONFIG_FILE)
    return str(path)


# ----------------------------------------------------------------------------- parse_arg / load


def test_parse_arg_types_and_unknown_keys():
    arg = config_lib.parse_arg("runlocal,steps=5,variant=large,lr=3e-4,ratio=0.5",
                               runlocal=False, steps=100, variant="base", lr=None, ratio=1.0)
    assert arg.runlocal is True and arg.steps == 5 and arg.variant == "large"
    assert arg.lr == pytest.approx(3e-4) and arg.ratio == 0.5
    assert config_lib.parse_arg(None, steps=3).steps == 3
    assert config_lib.parse_arg("", steps=3).steps == 3
    assert config_lib.parse_arg("runlocal=false", runlocal=True).runlocal is False
    assert config_lib.parse_arg("name=007", name="x").name == "007"  # str default keeps text.
    with pytest.raises(config_lib.ConfigError, match=r"unknown config argument\(s\) 'stepz', 'foo'.*known: runlocal, steps"):
        config_lib.parse_arg("stepz=5,foo", runlocal=False, steps=1)
    with pytest.raises(config_lib.ConfigError, match="config argument steps must be an integer, got 'many'"):
        config_lib.parse_arg("steps=many", steps=1)


def test_load_config_plain_and_with_variants(config_path):
    plain = config_lib.load_config(config_path)
    assert plain.optim.steps == 1000 and plain.input.batch_size == 512 and plain.variant == "base"
    local = config_lib.load_config(f"{config_path}:runlocal,steps=5,variant=tiny")
    assert local.optim.steps == 5 and local.input.batch_size == 8 and local.variant == "tiny"
    with pytest.raises(config_lib.ConfigError, match="'bogus'"):
        config_lib.load_config(f"{config_path}:bogus=1")


def test_load_config_errors(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "missing.py"))
    with pytest.raises(config_lib.ConfigError, match="must name a .py file"):
        config_lib.load_config("configs/x.yaml")
    (tmp_path / "none.py").write_text("X = 1\n")
    with pytest.raises(config_lib.ConfigError, match="defines no get_config"):
        config_lib.load_config(str(tmp_path / "none.py"))
    (tmp_path / "dict.py").write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    with pytest.raises(config_lib.ConfigError, match="must return an ml_collections.ConfigDict, got dict"):
        config_lib.load_config(str(tmp_path / "dict.py"))


# ----------------------------------------------------------------------------- overrides


def test_apply_overrides_follow_field_types(config_path):
    c = config_lib.load_config(config_path)
    config_lib.apply_overrides(c, [
        "--config.optim.lr=1e-4", "optim.steps=7", "config.optim.clip=false",
        "input.image_mean=(0.1, 0.2, 0.3)", "input.data_dir=/data/tfds", "input.dataset=coco_captions/2014",
        "optim.warmup=1",
    ])
    assert c.optim.lr == pytest.approx(1e-4) and isinstance(c.optim.lr, float)
    assert c.optim.steps == 7 and isinstance(c.optim.steps, int)
    assert c.optim.clip is False
    assert c.input.image_mean == (0.1, 0.2, 0.3)
    assert c.input.data_dir == "/data/tfds"  # Placeholder(str) field.
    assert c.input.dataset == "coco_captions/2014"
    assert c.optim.warmup == 1.0 and isinstance(c.optim.warmup, float)
    config_lib.apply_overrides(c, ["input.data_dir=None"])
    assert c.input.data_dir is None


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown config field config\.optim\.lrr; fields there: clip, lr, steps, warmup"),
    ("optimizer.lr=1", r"unknown config field config\.optimizer\.lr: config has no section 'optimizer'"),
    ("optim.steps=1.5", r"config\.optim\.steps must be an integer, got '1\.5'"),
    ("optim.lr=fast", r"config\.optim\.lr must be a number, got 'fast'"),
    ("optim.clip=maybe", r"config\.optim\.clip must be a bool"),
    ("optim=3", r"config\.optim is a section"),
    ("optim.lr", r"must look like a\.b\.c=value"),
])
def test_apply_overrides_errors_name_the_field(config_path, override, message):
    c = config_lib.load_config(config_path)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.apply_overrides(c, [override])


def test_absl_config_flags_accept_spec_and_overrides(config_path):
    """The documented CLI recipe: DEFINE_config_file understands `file.py:arg` and `--config.x=`."""
    argv = ["prog", f"--config={config_path}:runlocal,steps=9", "--config.optim.lr=0.25",
            "--config.input.image_size=32"]
    fv = flags.FlagValues()
    # A CLI passes nothing but the flag name; sys_argv stands in for sys.argv in this test.
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=fv,
                                             lock_config=True, sys_argv=argv)
    fv(argv)
    c = holder.value
    assert c.optim.steps == 9 and c.input.batch_size == 8
    assert c.optim.lr == 0.25 and c.input.image_size == 32
    config_lib.validate_input(c.input, process_count=1)


# ----------------------------------------------------------------------------- validation


def _input(**overrides):
    return config_lib.input_config(tokenizer="tok", **overrides)


def test_valid_input_section_passes():
    cfg = _input(batch_size=12, eval_batch_size=6)
    assert config_lib.validate_input(cfg, process_count=3) is cfg
    config_lib.validate_input(_input(data_dir="/tmp", crop_scale=(1.0, 1.0), shuffle_buffer=0),
                              process_count=1)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "config.input.batch_size must be a positive integer divisible by the number "
                      "of processes (1), got 0"),
    ("eval_batch_size", 2.5, "config.input.eval_batch_size must be a positive integer"),
    ("image_size", 0, "config.input.image_size must be a positive integer, got 0"),
    ("image_size", True, "config.input.image_size must be a positive integer, got True"),
    ("image_mean", (0.5, 0.5), "config.input.image_mean must be 3 numbers"),
    ("image_std", (0.5, 0.0, 0.5), "config.input.image_std must be > 0 in every channel"),
    ("image_std", (0.5, "a", 0.5), "config.input.image_std must be 3 numbers"),
    ("max_length", 2, "config.input.max_length must be an integer >= 3"),
    ("crop_scale", (0.0, 1.0), "config.input.crop_scale must be (low, high) with 0 < low <= high <= 1"),
    ("crop_scale", (0.8, 0.5), "config.input.crop_scale must be (low, high)"),
    ("crop_scale", (0.5, 1.5), "config.input.crop_scale must be (low, high)"),
    ("shuffle_buffer", -1, "config.input.shuffle_buffer must be an integer >= 0, got -1"),
    ("dataset", "", "config.input.dataset must be a non-empty TFDS name"),
    ("train_split", " ", "config.input.train_split must be a non-empty TFDS split"),
    ("tokenizer", None, "config.input.tokenizer must be a tokenizer directory or hub id, got None"),
    ("flip", 1, "config.input.flip must be a bool, got 1"),
    ("seed", -3, "config.input.seed must be an integer in [0, 2**63), got -3"),
    ("data_dir", "", "config.input.data_dir must be None or a directory path"),
])
def test_bad_input_values_raise_naming_the_field(field, value, message):
    cfg = _input()
    with cfg.ignore_type():
        cfg[field] = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate_input(cfg, process_count=1)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.batch_size .*processes \(4\), got 6"):
        config_lib.validate_input(_input(batch_size=6, eval_batch_size=8), process_count=4)
    missing = _input()
    del missing["flip"]
    with pytest.raises(config_lib.ConfigError, match=r"config\.input is missing field\(s\) \['flip'\]"):
        config_lib.validate_input(missing, process_count=1)
    with pytest.raises(config_lib.ConfigError, match="unknown config.input field"):
        config_lib.input_config(batchsize=3)


def test_helpers_and_registry(monkeypatch, config_path):
    c = config_lib.load_config(config_path)
    assert config_lib.require_positive(c, "optim.lr") == 5e-5
    assert config_lib.require_positive(c, "optim.steps", integer=True) == 1000
    assert config_lib.require_nonnegative(c, "optim.warmup") == 0.1
    assert config_lib.require_choice(c, "variant", ["base", "large"]) == "base"
    c.optim.lr = -1.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lr must be a positive number, got -1\.0"):
        config_lib.require_positive(c, "optim.lr")
    c.optim.lr = float("nan")
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lr must be a positive number"):
        config_lib.require_positive(c, "optim.lr")
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.warmup must be a positive integer"):
        config_lib.require_positive(c, "optim.warmup", integer=True)
    with pytest.raises(config_lib.ConfigError, match=r"config\.variant must be one of \['small'\], got 'base'"):
        config_lib.require_choice(c, "variant", ["small"])
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.beta is missing"):
        config_lib.get_field(c, "optim.beta")
    with pytest.raises(config_lib.ConfigError, match=r"config\.x must hold"):
        config_lib.check(False, "config.x", "must hold")

    # The registry: a section's validator runs only when that section is present.
    monkeypatch.setattr(config_lib, "_VALIDATORS", dict(config_lib._VALIDATORS))
    calls = []

    @config_lib.register_validator("optim")
    def _optim(config):
        calls.append("optim")
        config_lib.require_positive(config, "optim.lr")

    @config_lib.register_validator("sampler")
    def _sampler(config):
        calls.append("sampler")

    c.optim.lr = 1e-4
    assert config_lib.validate(c) is c  # input (built in) and optim run; sampler is absent.
    assert calls == ["optim"]
    c.optim.lr = 0.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.lr"):
        config_lib.validate(c)
    c.optim.lr = 1e-4
    c.input.max_length = 1
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.max_length"):
        config_lib.validate(c)


def test_configdict_roundtrip_keeps_types(config_path):
    """Overridden values survive ConfigDict's own type checks (locked configs, as the CLI uses)."""
    c = config_lib.load_config(config_path)
    c.lock()
    config_lib.apply_overrides(c, ["input.crop_scale=(0.3, 0.9)", "input.flip=true"])
    assert c.input.crop_scale == (0.3, 0.9) and c.input.flip is True
    with pytest.raises(config_lib.ConfigError, match="unknown config field config.input.nope"):
        config_lib.apply_overrides(c, ["input.nope=1"])
    assert isinstance(c, ml_collections.ConfigDict)


PAPER_DATA = {
    "ladic_coco.py": ("karpathy_captions/coco", "train+restval"),
    "ladic_coco.py:data=coco_captions": ("coco_captions/2014", "train+restval"),
    "ladic_official.py": ("karpathy_captions/coco", "train+restval"),
    "coca_coco.py": ("karpathy_captions/coco", "train+restval"),
    "prefix_diffusion_coco.py": ("karpathy_captions/coco", "train+restval"),
    "prefix_diffusion_coco.py:data=flickr30k": ("karpathy_captions/flickr30k", "train"),
    "clip_diffusionlm_flickr.py": ("karpathy_captions/flickr8k", "train"),
    "clip_diffusionlm_flickr.py:data=flickr30k+8k": ("karpathy_captions/flickr30k+8k", "train"),
    "mc_diffusion_cub.py": ("cub_captions/unseen_classes", "train"),
    "mc_diffusion_cub.py:split=cub": ("cub_captions/default", "train"),
}


@pytest.mark.parametrize("spec", sorted(PAPER_DATA))
def test_paper_configs_name_datasets_that_exist(spec):
    """Each paper config's dataset is a project builder config (or TFDS's coco_captions)."""
    import tensorflow_datasets as tfds

    from ladic_jax.data import datasets

    cfg = config_lib.load_config(os.path.join(REPO, "configs", spec))
    assert (cfg.input.dataset, cfg.input.train_split) == PAPER_DATA[spec]
    if datasets.register(cfg.input.dataset) is None:
        assert tfds.builder_cls(cfg.input.dataset.split("/")[0])  # TFDS's own
        return
    base, config = cfg.input.dataset.split("/")
    assert config in datasets.config_names(base)


def test_data_choice_is_checked():
    with pytest.raises(ValueError, match="data='flickr9k'"):
        config_lib.load_config(os.path.join(REPO, "configs/ladic_coco.py:data=flickr9k"))
    with pytest.raises(ValueError, match="split='birds'"):
        config_lib.load_config(os.path.join(REPO, "configs/mc_diffusion_cub.py:split=birds"))
