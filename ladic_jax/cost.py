"""What a compiled program costs in flops, with the sampler's loop counted as many times as it runs.

XLA's ``cost_analysis()`` counts the body of a ``while`` (``lax.scan``, ``fori_loop``) once, whatever its
trip count (DESIGN §8). The sampler is one program: the family's sampling context (image encoder, the
cross-attention keys and values, the null condition), a ``lax.scan`` of denoising steps, and the final
decoding. Its flops are counted here as the whole program's (the loop body once) plus ``loop_steps - 1``
times those of one denoising step compiled as its own program on the context and state the loop carries.
The phases are compiled on their own too, so that a reader sees where the work goes:

    context   sampling_context: image tokens, keys/values, null condition     once per batch
    step      denoise_step: the denoiser pass(es) of one step, the update     once per loop step
    finalize  decoding the last prediction into token ids                      once per batch

``scripts/benchmark.py`` (which also times each phase) and the AOT report (``ladic_jax.aot``) both count
this way; ``tests/test_cost.py`` checks the count against the program compiled with the loop unrolled and
against a closed-form count of the model's matrix multiplications.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding


def _analysis(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return cost or {}


def flops(compiled) -> float:
    """Flops of a compiled program as XLA counts them (a loop body once)."""
    return float(_analysis(compiled).get("flops", 0.0))


def bytes_accessed(compiled) -> float:
    """Bytes the program reads and writes in device memory as XLA estimates them (a loop body once)."""
    return float(_analysis(compiled).get("bytes accessed", 0.0))


def _compile(jitted, args):
    return jitted.lower(*args).compile()


@dataclasses.dataclass
class SamplerCost:
    """Flops (and bytes accessed) of one sampler call and its phases, as XLA reports them for one program
    (per device when it is split over several)."""

    loop_steps: int
    program: float | None = None   # the sampler program as XLA counts it (loop body once)
    context: float | None = None
    step: float | None = None
    finalize: float | None = None
    program_bytes: float | None = None
    step_bytes: float | None = None

    @property
    def total(self) -> float | None:
        """The program's flops with every loop step counted."""
        if self.program is None or self.step is None:
            return None
        return self.program + (self.loop_steps - 1) * self.step

    @property
    def total_bytes(self) -> float | None:
        """The program's bytes accessed with every loop step counted."""
        if self.program_bytes is None or self.step_bytes is None:
            return None
        return self.program_bytes + (self.loop_steps - 1) * self.step_bytes

    @property
    def denoising(self) -> float | None:
        """All loop steps."""
        return None if self.step is None else self.loop_steps * self.step


def phase_programs(family, sampler_cfg, params, batch, rng, mesh=None) -> dict[str, tuple[Callable, tuple]]:
    """The sampler's phases as jitted functions with their arguments: ``{"context": (fn, args), "step": ...,
    "finalize": ...}``. Arguments may be arrays or ShapeDtypeStructs; with a ``mesh``, the context and state
    are placed as the loop carries them (split over the batch, replicated where a leaf has no batch axis)."""
    bsz = jax.tree.leaves(batch)[0].shape[0]
    ctx = jax.eval_shape(lambda p, b: family.sampling_context(p, b, sampler_cfg), params, batch)
    state = jax.eval_shape(lambda p, c, r: family.initial_state(p, c, r, sampler_cfg), params, ctx, rng)

    def place(a):
        if mesh is None:
            return a
        split = a.ndim and a.shape[0] == bsz
        s = sharding.batch_sharding(mesh, a.ndim) if split else sharding.replicated(mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    ctx, state = jax.tree.map(place, ctx), jax.tree.map(place, state)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, **({} if mesh is None else {"sharding": sharding.replicated(mesh)}))
    return {
        "context": (jax.jit(lambda p, b: family.sampling_context(p, b, sampler_cfg)), (params, batch)),
        "step": (jax.jit(lambda p, c, s, t, tn, k: family.denoise_step(p, c, s, t, tn, k, sampler_cfg)),
                 (params, ctx, state, scalar, scalar, rng)),
        "finalize": (jax.jit(lambda p, c, s: family.finalize(p, c, s, sampler_cfg)), (params, ctx, state)),
    }


def sampler_cost(family, sampler_cfg, params, batch, rng, *, mesh=None, program=None,
                 compile_fn: Callable[[Any, tuple], Any] = _compile) -> SamplerCost:
    """Flops of one sampler call and of its phases.

    ``program``: the compiled sampler, if the caller has it (else compiled here from
    ``sampler.make_sample_fn``). ``compile_fn(jitted, args)`` compiles a phase; it may return None (e.g. the
    AOT check when a program does not fit), which leaves that figure None.
    """
    cost = SamplerCost(loop_steps=len(sampler_lib.loop_timesteps(family, sampler_cfg)))
    if program is None:
        program = compile_fn(sampler_lib.make_sample_fn(family, sampler_cfg), (params, batch, rng))
    if program is not None:
        cost.program, cost.program_bytes = flops(program), bytes_accessed(program)
    for name, (fn, args) in phase_programs(family, sampler_cfg, params, batch, rng, mesh).items():
        compiled = compile_fn(fn, args)
        if compiled is not None:
            setattr(cost, name, flops(compiled))
            if name == "step":
                cost.step_bytes = bytes_accessed(compiled)
    return cost
