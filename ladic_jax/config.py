"""Configs: loading `configs/*.py` files, string variants, field overrides and validation.

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`; the text after
a colon in the spec is its argument, which the file decodes with `parse_arg`:

    config = load_config("configs/ladic_shapes.py:runlocal,steps=5")
    apply_overrides(config, ["--config.optim.lr=1e-4", "input.batch_size=8"])
    validate(config)

Command-line tools use absl and ml_collections the standard way, which understands the same spec
and override syntax, then validate:

    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
    ...
    def main(argv):
      config = _CONFIG.value          # `--config configs/x.py:runlocal --config.optim.lr=1e-4`
      ladic_jax.config.validate(config)

Validation: each config section registers a validator with `@register_validator("section")`;
`validate(config)` runs those of the sections present in the config (a module's validator is
registered when that module is imported). Validators raise `ConfigError` naming the full field,
e.g. `config.input.batch_size must be a positive integer ..., got 0`; the helpers `check`,
`require_positive`, `require_choice` keep them short.
"""

from __future__ import annotations

import ast
import importlib.util
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigError",
    "load_config",
    "parse_arg",
    "apply_overrides",
    "input_config",
    "check",
    "get_field",
    "require_positive",
    "require_nonnegative",
    "require_choice",
    "register_validator",
    "validate",
    "validate_input",
]


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


# --------------------------------------------------------------------------- loading


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` by calling the file's `get_config` (with `arg` if given)."""
    path, sep, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"config spec {spec!r} must name a .py file, optionally followed by ':arg'")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} (from spec {spec!r}) does not exist")
    module_name = "_ladic_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses/pickling inside config files need this.
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    config = module.get_config(arg) if sep else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config() must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    if "sampler" in config:  # the sampler loop's own fields, so that they can be overridden like any other
        from ladic_jax import sampler as sampler_lib  # (imported here: it imports this module)
        sampler_lib.complete(config.sampler)
    if "input" in config:  # optional input fields, present so that they can be overridden like any other
        for key, value in (("resize", RESIZE_METHODS[0]), ("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)):
            if key not in config.input:
                config.input[key] = value
    if "optim" in config and "feature_cache" not in config:  # a training config: the cache is off unless set
        from ladic_jax import feature_cache
        config.feature_cache = feature_cache.default_section()
    return config


def _parse_scalar(text: str) -> Any:
    """'5' -> 5, '1e-4' -> 1e-4, 'true'/'false' -> bool, 'none' -> None, '(1, 2)' -> tuple, else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, (int, float, tuple, list, dict)) else text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Decodes a config file's string argument, e.g. "runlocal,steps=5,variant=base".

    A bare word sets that key to True; `key=value` parses the value to the type of the default
    (bool from true/false/1/0; int; float; str kept as is) or, with a None default, to a number,
    bool or tuple when it reads as one and a string otherwise. Keys not among `defaults` raise
    `ConfigError` naming them.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return result
    unknown = []
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            unknown.append(key)
            continue
        value = _convert(raw.strip() if sep else "true", defaults[key], f"config argument {key}")
        with result.ignore_type():
            result[key] = value
    if unknown:
        raise ConfigError(f"unknown config argument(s) {', '.join(map(repr, unknown))} in {arg!r}; "
                          f"known: {', '.join(sorted(defaults))}")
    return result


def _convert(raw: str, current: Any, field: str, field_type: type | None = None) -> Any:
    """Parses `raw` to the type of the current value (or `field_type` when the value is None)."""
    if current is None and field_type is None:
        return _parse_scalar(raw)
    kind = field_type if current is None else type(current)
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{field} must be a bool (true/false), got {raw!r}")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{field} must be an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{field} must be a number, got {raw!r}") from None
    if kind is str:
        return raw
    if kind in (tuple, list):
        value = _parse_scalar(raw)
        if not isinstance(value, (tuple, list)):
            value = (value,)  # "a=0.5" for a one-element tuple field.
        return kind(value)
    value = _parse_scalar(raw)
    if not isinstance(value, kind):
        raise ConfigError(f"{field} must be of type {kind.__name__}, got {raw!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies "a.b.c=value" overrides in place (a leading "--config." is accepted) and returns config.

    The value is parsed to the type of the existing field (a field holding None, or declared with
    `config_dict.placeholder(type)`, takes the placeholder type or any literal); `None` sets any
    field to None. Unknown fields raise `ConfigError` naming the field and the keys that exist at
    that level.
    """
    for override in overrides:
        item = override.strip()
        for prefix in ("--config.", "config."):
            if item.startswith(prefix):
                item = item[len(prefix):]
                break
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {override!r} must look like a.b.c=value")
        parent, key = _parent(config, path)
        field = f"config.{path}"
        if key not in parent:
            raise ConfigError(f"unknown config field {field}; fields there: {', '.join(sorted(parent.keys()))}")
        current = parent[key]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"{field} is a section, not a value; override one of its fields")
        field_type = parent.get_type(key) if current is None else None
        if raw.strip() in ("None", "none"):
            value = None
        else:
            value = _convert(raw, current, field, None if field_type is type(None) else field_type)
        try:
            parent[key] = value
        except TypeError as e:
            raise ConfigError(f"{field}: {e}") from None
    return config


def _parent(config: ml_collections.ConfigDict, path: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding the last component of a dotted path, and that component."""
    *sections, key = path.split(".")
    node = config
    for i, name in enumerate(sections):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(["config", *sections[:i]])
            keys = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
            raise ConfigError(f"unknown config field config.{path}: {where} has no section {name!r}"
                              + (f" (fields: {keys})" if keys else ""))
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"unknown config field config.{path}: config.{'.'.join(sections)} is not a section")
    return node, key


# --------------------------------------------------------------------------- validation helpers


def check(condition: bool, field: str, message: str) -> None:
    """Raises `ConfigError(f"{field} {message}")` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{field} {message}")


def get_field(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value at a dotted path such as 'optim.lr'; a missing field raises `ConfigError`."""
    parent, key = _parent(config, path)
    if key not in parent:
        raise ConfigError(f"config.{path} is missing")
    return parent[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_positive(config: ml_collections.ConfigDict, path: str, *, integer: bool = False) -> Any:
    """Checks that config.<path> is a (finite) number > 0, an int if `integer`; returns it."""
    value = get_field(config, path)
    kind = "integer" if integer else "number"
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) if integer else _is_number(value)
    check(ok and value > 0 and value == value and value != float("inf"),
          f"config.{path}", f"must be a positive {kind}, got {value!r}")
    return value


def require_nonnegative(config: ml_collections.ConfigDict, path: str, *, integer: bool = False) -> Any:
    """Checks that config.<path> is a (finite) number >= 0, an int if `integer`; returns it."""
    value = get_field(config, path)
    kind = "integer" if integer else "number"
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) if integer else _is_number(value)
    check(ok and value >= 0 and value == value and value != float("inf"),
          f"config.{path}", f"must be a non-negative {kind}, got {value!r}")
    return value


def require_choice(config: ml_collections.ConfigDict, path: str, choices: Sequence[Any]) -> Any:
    """Checks that config.<path> is one of `choices`; returns it."""
    value = get_field(config, path)
    check(value in choices, f"config.{path}", f"must be one of {list(choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- validator registry

_VALIDATORS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {}


def register_validator(section: str):
    """Decorator: `fn(config)` validates `config.<section>`; run by `validate` when it is present."""

    def decorate(fn: Callable[[ml_collections.ConfigDict], None]):
        _VALIDATORS[section] = fn
        return fn

    return decorate


def validate(config: ml_collections.ConfigDict, exclude: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs the registered validator of every section present in `config` but those in `exclude`;
    returns config."""
    for section, fn in _VALIDATORS.items():
        if section in config and section not in exclude:
            fn(config)
    return config


# --------------------------------------------------------------------------- mixed precision

#: ``config.dtype``: the activation and matmul dtype of every model. Parameters, optimizer state, losses and
#: their reductions, attention softmax and the denoisers' outputs stay float32 either way; "bfloat16" is
#: mixed precision for TPU/GPU, "float32" the CPU default.
DTYPES = ("float32", "bfloat16")


@register_validator("dtype")
def _validate_dtype(config) -> None:
    check(config.dtype in DTYPES, "config.dtype", f"must be one of {list(DTYPES)}, got {config.dtype!r}")


# --------------------------------------------------------------------------- the input section


# Pixel limit of a decoded image: 4096 x 4096 RGB is 48 MiB as uint8, 192 MiB as float32.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# `config.input.resize`: how the input pipeline resizes images (`ladic_jax.data.pipeline`); the first is the
# default, also for configs without the field.
RESIZE_METHODS = ("tf_bicubic", "pil_bicubic")


def input_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.input` section with its defaults (for the synthetic dataset), updated by `overrides`.

    Fields: dataset (TFDS name with config), data_dir, train_split, eval_split, image_size,
    image_mean/image_std (per channel, applied after scaling pixels to [0, 1]), max_length (tokens
    incl. [CLS]/[SEP]), tokenizer (local dir or hub id), random_resized_crop, crop_scale (area
    fraction range), flip (mirror half the training images and swap left/right in their
    captions), shuffle_buffer (records; 0 = no shuffle), batch_size and eval_batch_size (global),
    seed, train_captions ("sample": one reference drawn per image per epoch; "first": always the
    first reference; "shortest": always the reference of fewest words, the first of those),
    train_caption_file (optional: JSON lines of image_id and caption that replace the references of those
    training images, e.g. a teacher's captions for sequence-level distillation), max_image_pixels
    (images declaring more pixels are decoded smaller or skipped; the rules in
    `ladic_jax.data.bad_records`; optional, `DEFAULT_MAX_IMAGE_PIXELS` when absent), resize (one of
    `RESIZE_METHODS`: "tf_bicubic", TensorFlow's antialiased bicubic, or "pil_bicubic", PIL's bicubic resize
    exactly, as the LaDiC release preprocesses; optional, "tf_bicubic" when absent).
    """
    cfg = ml_collections.ConfigDict({
        "dataset": "shapes_captions/default",
        "data_dir": config_dict.placeholder(str),
        "train_split": "train",
        "eval_split": "test",
        "image_size": 64,
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
        "max_length": 24,
        "tokenizer": config_dict.placeholder(str),
        "random_resized_crop": False,
        "crop_scale": (0.5, 1.0),
        "flip": False,
        "shuffle_buffer": 10_000,
        "batch_size": 64,
        "eval_batch_size": 64,
        "seed": 0,
        "train_captions": "sample",
        "train_caption_file": "",
        "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
        "resize": RESIZE_METHODS[0],
    })
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ConfigError(f"unknown config.input field(s) {unknown}; known: {sorted(cfg.keys())}")
    for key, value in overrides.items():
        with cfg.ignore_type():
            cfg[key] = value
    return cfg


_INPUT_FIELDS = ("dataset", "data_dir", "train_split", "eval_split", "image_size", "image_mean",
                 "image_std", "max_length", "tokenizer", "random_resized_crop", "crop_scale", "flip",
                 "shuffle_buffer", "batch_size", "eval_batch_size", "seed", "train_captions")


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_input(input_cfg: ml_collections.ConfigDict, *, process_count: int | None = None,
                   prefix: str = "config.input") -> ml_collections.ConfigDict:
    """Checks every field of the input section; `process_count` defaults to `jax.process_count()`."""
    if process_count is None:
        import jax  # Deferred: configs and their validation should not need a JAX backend to load.

        process_count = jax.process_count()
    missing = [k for k in _INPUT_FIELDS if k not in input_cfg]
    check(not missing, prefix, f"is missing field(s) {missing}")
    c = input_cfg

    def f(name: str) -> str:
        return f"{prefix}.{name}"

    check(_nonempty_str(c.dataset), f("dataset"), f"must be a non-empty TFDS name, got {c.dataset!r}")
    check(c.data_dir is None or _nonempty_str(c.data_dir), f("data_dir"),
          f"must be None or a directory path, got {c.data_dir!r}")
    for name in ("train_split", "eval_split"):
        check(_nonempty_str(c[name]), f(name), f"must be a non-empty TFDS split, got {c[name]!r}")
    check(_nonempty_str(c.tokenizer), f("tokenizer"),
          f"must be a tokenizer directory or hub id, got {c.tokenizer!r}")
    check(is_int(c.image_size) and c.image_size > 0, f("image_size"),
          f"must be a positive integer, got {c.image_size!r}")
    for name in ("image_mean", "image_std"):
        value = c[name]
        check(isinstance(value, (tuple, list)) and len(value) == 3 and all(map(_is_number, value)),
              f(name), f"must be 3 numbers (one per RGB channel), got {value!r}")
    check(all(s > 0 for s in c.image_std), f("image_std"), f"must be > 0 in every channel, got {c.image_std!r}")
    check(is_int(c.max_length) and c.max_length >= 3, f("max_length"),
          f"must be an integer >= 3 ([CLS], a token, [SEP]), got {c.max_length!r}")
    for name in ("random_resized_crop", "flip"):
        check(isinstance(c[name], bool), f(name), f"must be a bool, got {c[name]!r}")
    scale = c.crop_scale
    check(isinstance(scale, (tuple, list)) and len(scale) == 2 and all(map(_is_number, scale))
          and 0 < scale[0] <= scale[1] <= 1, f("crop_scale"),
          f"must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    check(is_int(c.shuffle_buffer) and c.shuffle_buffer >= 0, f("shuffle_buffer"),
          f"must be an integer >= 0, got {c.shuffle_buffer!r}")
    for name in ("batch_size", "eval_batch_size"):
        value = c[name]
        check(is_int(value) and value > 0 and value % process_count == 0, f(name),
              f"must be a positive integer divisible by the number of processes ({process_count}), "
              f"got {value!r}")
    check(is_int(c.seed) and 0 <= c.seed < 2**63, f("seed"), f"must be an integer in [0, 2**63), got {c.seed!r}")
    check(c.train_captions in ("sample", "first", "shortest"), f("train_captions"),
          f"must be 'sample' (one reference drawn per image per epoch), 'first' or 'shortest', "
          f"got {c.train_captions!r}")
    if c.get("train_caption_file"):
        check(isinstance(c.train_caption_file, str), f("train_caption_file"),
              f"must be a path to a JSON-lines file of image_id and caption, got {c.train_caption_file!r}")
    if "max_image_pixels" in c:  # Optional: configs saved before it existed take the default.
        check(is_int(c.max_image_pixels) and c.max_image_pixels > 0, f("max_image_pixels"),
              f"must be a positive integer (pixels), got {c.max_image_pixels!r}")
    if "resize" in c:  # Optional: configs without it resize with RESIZE_METHODS[0].
        check(c.resize in RESIZE_METHODS, f("resize"),
              f"must be one of {list(RESIZE_METHODS)} (TensorFlow's antialiased bicubic, or PIL's bicubic as "
              f"the LaDiC release resizes), got {c.resize!r}")
    return input_cfg


@register_validator("input")
def _validate_input_section(config: ml_collections.ConfigDict) -> None:
    validate_input(config.input)
