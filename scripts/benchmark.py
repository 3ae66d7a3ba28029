"""Throughput of a config on this machine: training examples/s and sampling seconds per image.

Prints, for the jitted train step and the sampler: wall time per call, examples (captions) per second,
FLOPs per call from XLA's cost analysis, and the achieved FLOP rate against the measured peak of a
large float32 matmul on the same devices (the utilisation of DESIGN §8). Synthetic inputs: no dataset
is read, so this measures the model and the step, not the input pipeline.

  python scripts/benchmark.py --config configs/ladic_shapes.py [--steps 5,30] [--batch 32] [--iters 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_peak(n: int = 2048, iters: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / _time(f, a, iters=iters)


def main(argv=None) -> None:
    from ladic_jax import config as config_lib
    from ladic_jax import sampler as sampler_lib
    from ladic_jax import sharding, trainer
    from ladic_jax.evaluation.evaluator import sampler_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--sample-batch", type=int, default=100)
    p.add_argument("--steps", default="5,30", help="sampling steps to time, comma-separated")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    args = p.parse_args(argv)
    cfg = config_lib.load_config(args.config)
    config_lib.apply_overrides(cfg, args.overrides)
    if args.batch:
        cfg.input.batch_size = args.batch
    sk = trainer.skeleton(cfg)
    fam = sk.family
    params = jax.jit(sk.init_fn, out_shardings=sk.state_shardings["params"])(jax.random.key(0))
    opt_state = jax.jit(sk.tx.init, out_shardings=sk.state_shardings["opt_state"])(params)
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt_state, "rng": jax.random.key(1)}
    B, L, S = cfg.input.batch_size, cfg.input.max_length, cfg.input.image_size
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({
        "image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
        "tokens": rng.integers(1000, 2000, (B, L)).astype(np.int32),
        "token_mask": np.ones((B, L), np.int32)}, sk.mesh)
    peak = matmul_peak()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; float32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")

    step = trainer.make_train_step(sk)
    flops = _flops(step, state, batch)
    state, _ = step(state, batch)  # compile + first step (the state is donated)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.iters
    print(f"train step, batch {B}: {dt * 1e3:.0f} ms, {B / dt:.1f} examples/s, {flops / 1e9:.1f} GFLOP/step, "
          f"{flops / dt / 1e9:.1f} GFLOP/s ({100 * flops / dt / peak:.0f}% of peak)")

    SB = args.sample_batch
    images = sharding.global_batch({"image": rng.normal(size=(SB, S, S, 3)).astype(np.float32)}, sk.mesh)
    for n in (int(x) for x in args.steps.split(",")):
        fn = sampler_lib.make_sample_fn(fam, sampler_config(cfg, steps=n))
        f = _flops(fn, state["params"], images, jax.random.key(0))
        dt = _time(fn, state["params"], images, jax.random.key(0), iters=max(1, args.iters // 2))
        print(f"sampler, {n} steps, batch {SB}, guidance {cfg.sampler.guidance}: {dt / SB * 1e3:.2f} ms/image, "
              f"{SB / dt:.1f} captions/s, {f / 1e9:.1f} GFLOP/batch ({100 * f / dt / peak:.0f}% of peak)")


if __name__ == "__main__":
    main()
