"""The one sampler loop for every family: a jitted ``lax.scan`` over the family's denoising steps.

The family computes everything that is constant across steps once (``sampling_context``: image
tokens, cross-attention keys and values), then the loop carries only the per-step state.

Two options of the loop itself, read from the sampler config:

- **Back&Refine** (LaDiC §3.4, ``sampler.back_refine``): a first pass runs the schedule down to
  t = ``at`` · T (the steps with t >= at·T, at least one; T = the first timestep + 1); then the family keeps the ``keep`` fraction
  of positions it is most confident of, replaces the others with fresh noise, and a second pass runs
  the whole schedule again from T. Both passes are one scan (the restart is a ``lax.cond`` at the step
  where it happens). The second pass uses exactly the noise and step keys of plain sampling with the
  same key (the first pass draws from ``fold_in(rng, 1)``), so with ``keep = 0`` -- every position
  renoised -- the result is plain sampling's.
- **Trajectory** (``trajectory=True``): the scan also returns, per step, the tokens decoded from the
  current prediction and the distance of the current latent prediction to the final one; no second loop.
  It holds every step's latent prediction (steps x batch x length x width floats) until the end.

Several candidates per image (``sampler.mbr``), one kept by Minimum Bayes Risk or by CLIP re-ranking
(``sampler.mbr_metric``), run beside the loop, in ``ladic_jax.evaluation.evaluator.mbr_sample``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax import sharding
from ladic_jax.families.base import Family

#: Sampler fields that act beside the loop (the compiled function does not depend on them).
HOST_FIELDS = ("mbr", "mbr_metric")
MBR_METRICS = ("bleu", "cider", "clip")  # "clip": re-rank by the family's own CLIP image-text cosine
# Classifier-free guidance's two passes as one call on 2B rows (True) or two calls on B.
BATCH_GUIDANCE = True


def default_fields() -> dict[str, Any]:
    """The loop's own sampler fields with their defaults (both techniques off), and how families run the two
    passes of classifier-free guidance (``batch_guidance``: one call on 2B rows; ``families/guidance.py``)."""
    return {"back_refine": {"enabled": False, "at": 0.5, "keep": 0.5}, "mbr": 1, "mbr_metric": "bleu",
            "batch_guidance": BATCH_GUIDANCE}


def complete(sampler_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the fields of ``default_fields`` that a sampler config lacks (runs saved before they existed)."""
    with sampler_cfg.unlocked():
        for key, value in default_fields().items():
            if key not in sampler_cfg:
                sampler_cfg[key] = value
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if sub not in sampler_cfg[key]:
                        sampler_cfg[key][sub] = v
    return sampler_cfg


def validate_sampler(sampler_cfg, prefix: str = "config.sampler") -> None:
    """Checks the loop's own fields (absent ones take their defaults), naming the field."""
    def _fraction(value, low_open: bool) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and (0 < value <= 1 if low_open else 0 <= value <= 1)

    br = sampler_cfg.get("back_refine")
    if br is not None:
        enabled = br.get("enabled", False)
        config_lib.check(isinstance(enabled, bool), f"{prefix}.back_refine.enabled", f"must be a bool, got {enabled!r}")
        at, keep = br.get("at", 0.5), br.get("keep", 0.5)
        config_lib.check(_fraction(at, True), f"{prefix}.back_refine.at",
                         f"must be a fraction of the schedule in (0, 1] (t/T where the first pass stops), got {at!r}")
        config_lib.check(_fraction(keep, False), f"{prefix}.back_refine.keep",
                         f"must be the fraction of positions kept, in [0, 1], got {keep!r}")
    mbr = sampler_cfg.get("mbr", 1)
    config_lib.check(isinstance(mbr, int) and not isinstance(mbr, bool) and mbr >= 1, f"{prefix}.mbr",
                     f"must be the number of candidates per image, an int >= 1, got {mbr!r}")
    batched = sampler_cfg.get("batch_guidance", BATCH_GUIDANCE)
    config_lib.check(isinstance(batched, bool), f"{prefix}.batch_guidance", f"must be a bool, got {batched!r}")
    metric = sampler_cfg.get("mbr_metric", "bleu")
    config_lib.check(metric in MBR_METRICS, f"{prefix}.mbr_metric", f"must be one of {list(MBR_METRICS)}, got {metric!r}")


@config_lib.register_validator("sampler")
def _validate_sampler_section(config) -> None:
    validate_sampler(config.sampler)


def _back_refine(sampler_cfg) -> tuple[float, float] | None:
    br = sampler_cfg.get("back_refine")
    if br is None or not br.get("enabled", False):
        return None
    return float(br.get("at", 0.5)), float(br.get("keep", 0.5))


def loop_timesteps(family: Family, sampler_cfg) -> np.ndarray:
    """The timestep of every step of the loop, restarts included: ``(S,)`` int32."""
    return _plan(family, sampler_cfg)[0]


def _plan(family: Family, sampler_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(t, t_next, restart flag) per loop step, and the length of the first pass (0: no Back&Refine)."""
    ts = np.asarray(family.timesteps(sampler_cfg), dtype=np.int32)
    t_next = np.concatenate([ts[1:], np.array([-1], np.int32)])
    br = _back_refine(sampler_cfg)
    if br is None:
        return ts, t_next, np.zeros(len(ts), bool), 0
    T = int(ts[0]) + 1  # schedules start at the noisiest timestep T - 1
    first = int(min(len(ts), max(1, np.sum(ts >= br[0] * T))))
    restart = np.zeros(first + len(ts), bool)
    restart[first] = True
    return (np.concatenate([ts[:first], ts]), np.concatenate([t_next[:first], t_next]), restart, first)


def sample(family: Family, params: Any, batch: dict[str, jax.Array], rng: jax.Array, sampler_cfg,
           trajectory: bool = False) -> jax.Array | dict[str, jax.Array]:
    """Token ids (B, L) for the images in ``batch``. Trace under jit; sampler_cfg must be static.

    With ``trajectory``, a dict: ``tokens`` (B, L); ``step_tokens`` (B, S, L), the tokens decoded from
    the prediction after each of the S loop steps (``loop_timesteps``); ``latent_distance`` (B, S), the
    mean over positions of the L2 distance between each step's latent prediction and the final one.
    """
    ts, t_next, restart, first = _plan(family, sampler_cfg)
    context = family.sampling_context(params, batch, sampler_cfg)
    init_rng, loop_rng = jax.random.split(rng)
    state = family.initial_state(params, context, init_rng, sampler_cfg)
    keys = jax.random.split(loop_rng, len(ts) - first)
    fresh = None
    if first:
        # The refine pass restarts from plain sampling's noise with its keys; the first pass draws anew.
        fresh = state
        first_init, first_loop = jax.random.split(jax.random.fold_in(rng, 1))
        state = family.initial_state(params, context, first_init, sampler_cfg)
        keys = jnp.concatenate([jax.random.split(first_loop, first), keys])

    def body(state, xs):
        t, tn, key, back = xs
        if fresh is not None:
            state = jax.lax.cond(
                back, lambda s: family.back_and_refine(params, context, s, fresh, sampler_cfg), lambda s: s, state)
        state = family.denoise_step(params, context, state, t, tn, key, sampler_cfg)
        return state, (family.prediction(params, context, state, sampler_cfg) if trajectory else None)

    xs = (jnp.asarray(ts), jnp.asarray(t_next), keys, jnp.asarray(restart))
    state, steps = jax.lax.scan(body, state, xs)
    tokens = family.finalize(params, context, state, sampler_cfg)
    if not trajectory:
        return tokens
    step_tokens, latents = steps  # (S, B, L), (S, B, L, D)
    diff = latents.astype(jnp.float32) - latents[-1].astype(jnp.float32)
    distance = jnp.mean(jnp.sqrt(jnp.sum(diff * diff, -1)), -1)  # (S, B)
    return {"tokens": tokens, "step_tokens": jnp.swapaxes(step_tokens, 0, 1), "latent_distance": distance.T}


def records_trajectory(family: Family) -> bool:
    """Whether the family's states hold a clean prediction to record per step (``Family.prediction``)."""
    return type(family).prediction is not Family.prediction


def make_sample_fn(family: Family, sampler_cfg, trajectory: bool = False, **jit_kwargs) -> Callable:
    """jit-compiled ``fn(params, batch, rng) -> token ids`` (or the trajectory dict); one compilation per
    sampler config."""
    if trajectory and not records_trajectory(family):
        raise ValueError(f"family {family.name!r} has no denoising trajectory to record (--show-steps, --trajectory)")

    def fn(params, batch, rng):
        return sample(family, params, batch, rng, sampler_cfg, trajectory)
    return jax.jit(fn, **jit_kwargs)


def _output_shardings(mesh, trajectory: bool):
    """The sampler's outputs split over the batch like its inputs."""
    if not trajectory:
        return sharding.batch_sharding(mesh, 2)
    return {"tokens": sharding.batch_sharding(mesh, 2), "step_tokens": sharding.batch_sharding(mesh, 3),
            "latent_distance": sharding.batch_sharding(mesh, 2)}


class SampleFns:
    """The jit-compiled sample functions of one family, one per distinct sampler config, built once.

    With a ``mesh``, the outputs are sharded over its data-parallel axes (as the evaluator gathers them).
    """

    def __init__(self, family: Family, mesh=None):
        self.family = family
        self.mesh = mesh
        self._fns: dict[tuple, Callable] = {}

    def __call__(self, sampler_cfg, trajectory: bool = False) -> Callable:
        loop_fields = {k: v for k, v in sampler_cfg.to_dict().items() if k not in HOST_FIELDS}
        key = (json.dumps(loop_fields, sort_keys=True, default=str), trajectory)
        if key not in self._fns:
            kwargs = {} if self.mesh is None else {"out_shardings": _output_shardings(self.mesh, trajectory)}
            self._fns[key] = make_sample_fn(self.family, sampler_cfg, trajectory, **kwargs)
        return self._fns[key]
