"""Classifier-free guidance, shared by the families: x̂ = (1 + w) f(x, c) - w f(x, ∅) (Ho & Salimans 2022).

The two passes run either as two calls of the denoiser on B rows, or (``sampler.batch_guidance``) as one
call on 2B rows. Rows are paired per image -- row 2i is image i's conditional pass, row 2i + 1 its null
pass -- rather than stacked as [all conditional; all null], so that when the batch is split over devices
each device keeps both passes of its own images and nothing moves between devices. The paired condition
is built once per batch in the sampling context (``"cond_null"``), not at every step.

A null condition that is the same for every image (a learned null vector; the release's all-zero image) is
computed for one row and broadcast (``broadcast_rows``): the image encoder and the keys/values of the null
then cost one image, not B.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def pair_rows(a, b):
    """Interleaves two pytrees of (B, ...) arrays into (2B, ...): rows a_0, b_0, a_1, b_1, ..."""
    return jax.tree.map(lambda x, y: jnp.stack([x, y], axis=1).reshape((-1,) + x.shape[1:]), a, b)


def unpair_rows(ab):
    """The inverse of ``pair_rows`` for one array: (2B, ...) -> ((B, ...), (B, ...))."""
    pairs = ab.reshape((-1, 2) + ab.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def broadcast_rows(tree, rows: int):
    """A pytree computed for one row, (1, ...) arrays, as (rows, ...) arrays."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:]), tree)


def context(cond, null, sampler_cfg) -> dict[str, Any]:
    """The sampling-context entries for guidance: ``cond`` and ``null`` (each B rows), and with
    ``sampler.batch_guidance`` the two paired once into ``cond_null`` (2B rows) instead of ``null``."""
    if sampler_cfg.get("batch_guidance", False):
        return {"cond": cond, "cond_null": pair_rows(cond, null)}
    return {"cond": cond, "null": null}


def combine(f: Callable, args: tuple, ctx: dict[str, Any], w: float):
    """(1 + w) f(*args, cond) - w f(*args, null), in one paired call if ``ctx`` holds ``cond_null``.
    ``args`` are (B, ...) arrays; ``f`` returns (B, ...)."""
    if "cond_null" in ctx:
        out_cond, out_null = unpair_rows(f(*(pair_rows(a, a) for a in args), ctx["cond_null"]))
    else:
        out_cond, out_null = f(*args, ctx["cond"]), f(*args, ctx["null"])
    return (1.0 + w) * out_cond - w * out_null
