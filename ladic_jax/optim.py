"""Optimizer from config: AdamW, warmup + linear/cosine decay, clipping, freezing by regex.

``config.optim`` fields:
  lr, warmup (fraction of total steps if < 1, else steps), warmup_init_lr (where the warmup starts,
  default 0), decay ("linear" | "cosine" | "constant"),
  end_lr_factor, weight_decay, b1, b2, eps, grad_clip (global-norm clipping; 0 = off),
  weight_decay_mask: "matrices" (default: parameters with ndim >= 2, not biases, LayerNorm scales or the like)
    | "all" (every trainable parameter, as torch's AdamW over model.parameters(): the LaDiC release),
  frozen: list of regexes over parameter paths ("text/lower/.*"); matched parameters get no update.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from ladic_jax import config as config_lib
from ladic_jax.sharding import path_str


WEIGHT_DECAY_MASKS = ("matrices", "all")


def warmup_steps(optim_cfg, total_steps: int) -> int:
    w = optim_cfg.warmup
    return int(round(w * total_steps)) if w < 1 else int(w)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    peak = optim_cfg.lr
    warm = warmup_steps(optim_cfg, total_steps)
    rest = max(total_steps - warm, 1)
    end = peak * optim_cfg.get("end_lr_factor", 0.0)
    if optim_cfg.decay == "linear":
        decay = optax.linear_schedule(peak, end, rest)
    elif optim_cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
    elif optim_cfg.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optim.decay must be linear, cosine or constant, got {optim_cfg.decay!r}")
    if warm == 0:
        return decay
    start = optim_cfg.get("warmup_init_lr", 0.0)
    return optax.join_schedules([optax.linear_schedule(start, peak, warm), decay], [warm])


def frozen_mask(params: Any, patterns: list[str]) -> Any:
    """Pytree of bools: True where the parameter path matches one of the regexes."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(r.search(path_str(path)) for r in compiled), params)


def make_optimizer(optim_cfg, params: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    if optim_cfg.get("weight_decay_mask", "matrices") == "all":
        decay_mask = jax.tree.map(lambda p: True, params)
    else:
        decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = []
    if optim_cfg.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    frozen = frozen_mask(params, list(optim_cfg.get("frozen", [])))
    if any(jax.tree.leaves(frozen)):
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def count_params(params: Any, mask: Any | None = None) -> int:
    leaves = jax.tree.leaves(params)
    if mask is None:
        return sum(int(x.size) for x in leaves)
    return sum(int(x.size) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)


@config_lib.register_validator("optim")
def validate_optim(config) -> None:
    c = config_lib
    c.require_positive(config, "optim.lr")
    c.require_nonnegative(config, "optim.warmup")
    c.require_choice(config, "optim.decay", ("linear", "cosine", "constant"))
    c.require_nonnegative(config, "optim.weight_decay")
    if "weight_decay_mask" in config.optim:
        c.require_choice(config, "optim.weight_decay_mask", WEIGHT_DECAY_MASKS)
    c.require_nonnegative(config, "optim.grad_clip")
    c.require_positive(config, "optim.eps")
    for name in ("b1", "b2"):
        v = c.get_field(config, f"optim.{name}")
        c.check(isinstance(v, (int, float)) and 0 <= v < 1, f"config.optim.{name}", f"must be in [0, 1), got {v!r}")
    end = config.optim.get("end_lr_factor", 0.0)
    c.check(0 <= end <= 1, "config.optim.end_lr_factor", f"must be in [0, 1], got {end!r}")
    for i, pattern in enumerate(config.optim.get("frozen", [])):
        try:
            re.compile(pattern)
        except re.error as e:
            raise c.ConfigError(f"config.optim.frozen[{i}] = {pattern!r} is not a valid regex: {e}") from None
