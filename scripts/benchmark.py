"""Throughput of a config on this machine: training examples/s and sampling seconds per image, with flops
counted right and the utilisation against the matmul peak measured in the same run.

  python scripts/benchmark.py --config configs/ladic_official.py --batch 4 --sample-batch 4 --steps 5 \
      [--iters 5] [--config.sampler.guidance=1 ...]

Train step: the jitted step compiled once ahead of time and that executable timed (a call can never trace
or compile again inside the timing), flops from its cost analysis; with a frozen image encoder (e.g.
``ladic_shapes.py:tower=DIR``, ``ladic_coco.py``) also the step that reads its cached features
(``config.feature_cache``). Sampler: the sampler program compiled
once and timed; its flops counted with every loop step (``ladic_jax/cost.py``: XLA's cost analysis counts a
loop body once), and each phase -- the sampling context (image encoder, cross-attention keys/values, null
condition), one denoising step, the final decoding -- compiled, counted and timed on its own, so that the
table shows where the time goes. Utilisation = counted flops / time / peak, the peak being a large float32
matmul timed in the same run (before; it is timed again at the end, to show whether the machine stayed
quiet). Synthetic inputs: no dataset is read.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, *args, iters: int) -> float:
    """Seconds per call of fn(*args), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def matmul_peak(n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a).lower(a).compile()
    return 2 * n ** 3 / _time(f, a, iters=iters)


def _row(name: str, seconds: float, flops: float | None, peak: float, extra: str = "") -> str:
    util = f"{100 * flops / seconds / peak:5.1f}%" if flops else "    -"
    gf = f"{flops / 1e9:10.2f}" if flops else "         -"
    return f"  {name:<38} {seconds * 1e3:10.2f} {gf} {util}  {extra}"


def main(argv=None) -> None:
    from ladic_jax import aot
    from ladic_jax import config as config_lib
    from ladic_jax import feature_cache
    from ladic_jax import cost as cost_lib
    from ladic_jax import sampler as sampler_lib
    from ladic_jax import sharding, trainer
    from ladic_jax.cli import common
    from ladic_jax.evaluation.evaluator import sampler_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, optionally with variants (file.py:runlocal)")
    p.add_argument("--batch", type=int, default=None, help="global training batch (default: the config's)")
    p.add_argument("--sample-batch", type=int, default=100, help="images per sampler call (default: %(default)s)")
    p.add_argument("--steps", default="5,30", help="sampling steps to time, comma-separated (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per figure (default: %(default)s)")
    p.add_argument("--skip-train", action="store_true", help="time the sampler only")
    p.add_argument("--skip-sampler", action="store_true", help="time the train step only")
    args, overrides = common.parse(p, argv)
    try:
        cfg, notes = aot.offline_config(common.load(args.config, overrides))  # no dataset or download needed
    except config_lib.ConfigError as e:
        common.fail(str(e))
    for note in notes:
        print(f"note: {note}")
    if args.batch:
        cfg.input.batch_size = args.batch
    sk = trainer.skeleton(cfg, check_batches=False)
    fam = sk.family
    params = jax.jit(sk.init_fn, out_shardings=sk.state_shardings["params"])(jax.random.key(0))
    B, L, S = cfg.input.batch_size, cfg.input.max_length, cfg.input.image_size
    rng = np.random.default_rng(0)
    peak = matmul_peak()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; float32 2048^3 matmul: "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'':2} {'program':<38} {'ms/call':>10} {'GFLOP':>10} {'util':>6}")

    if not args.skip_train:
        batch = {"image": rng.normal(size=(B, S, S, 3)).astype(np.float32),
                 "tokens": rng.integers(1000, 2000, (B, L)).astype(np.int32),
                 "token_mask": np.ones((B, L), np.int32)}
        variants = {"": batch}
        try:  # a frozen encoder: also time the step reading its features (config.feature_cache) side by side
            feature_cache.check_frozen(fam, sk.frozen)
            cached = {k: v for k, v in batch.items() if k != "image"}
            cached[fam.feature_field] = np.asarray(jax.jit(fam.frozen_features)(
                params, sharding.global_batch({"image": batch["image"]}, sk.mesh)["image"]))
            variants[f", cached {fam.feature_field}"] = cached
        except config_lib.ConfigError:
            pass
        for label, host_batch in variants.items():
            opt_state = jax.jit(sk.tx.init, out_shardings=sk.state_shardings["opt_state"])(params)
            state = {"step": jnp.int32(0), "params": params, "opt_state": opt_state, "rng": jax.random.key(1)}
            # A copy of the parameters for what follows: the train step donates the state's buffers.
            params = jax.tree.map(jnp.copy, params)
            batch = sharding.global_batch(host_batch, sk.mesh)
            step = trainer.make_train_step(sk).lower(state, batch).compile()
            flops = cost_lib.flops(step)
            state, m = step(state, batch)  # warm-up (the state is donated: carry it)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                state, m = step(state, batch)
            jax.block_until_ready(m)
            dt = (time.perf_counter() - t0) / args.iters
            print(_row(f"train step, batch {B}{label}", dt, flops, peak,
                       f"{1 / dt:.2f} steps/s, {B / dt:.1f} examples/s"))
            del state, step

    if not args.skip_sampler:
        SB = args.sample_batch
        images = sharding.global_batch({"image": rng.normal(size=(SB, S, S, 3)).astype(np.float32)}, sk.mesh)
        key = jax.random.key(0)
        for n in (int(x) for x in args.steps.split(",")):
            scfg = sampler_config(cfg, steps=n)
            program = sampler_lib.make_sample_fn(fam, scfg).lower(params, images, key).compile()
            cost = cost_lib.sampler_cost(fam, scfg, params, images, key, program=program)
            dt = _time(program, params, images, key, iters=max(1, args.iters // 2))
            guidance = scfg.get("guidance", None)
            print(_row(f"sampler, {n} steps", dt, cost.total, peak,
                       f"batch {SB}, guidance {guidance}: {dt / SB * 1e3:.2f} ms/image, {SB / dt:.1f} captions/s"))
            phases = cost_lib.phase_programs(fam, scfg, params, images, key)
            ctx_fn, ctx_args = phases["context"]
            ctx = ctx_fn(*ctx_args)
            state = jax.jit(lambda p, c, r: fam.initial_state(p, c, r, scfg))(params, ctx, key)
            t = jnp.int32(int(sampler_lib.loop_timesteps(fam, scfg)[0]))
            timed = {"context": (ctx_fn, ctx_args), "step": (phases["step"][0], (params, ctx, state, t, t, key)),
                     "finalize": (phases["finalize"][0], (params, ctx, state))}
            for name, (fn, fn_args) in timed.items():
                compiled = fn.lower(*fn_args).compile()
                seconds = _time(compiled, *fn_args, iters=args.iters)
                reps = cost.loop_steps if name == "step" else 1
                print(_row(f"  {name}" + (f" (x{reps})" if reps > 1 else ""), seconds, getattr(cost, name), peak,
                           f"{100 * seconds * reps / dt:.0f}% of the sampler's time"))
    peak_after = matmul_peak()
    print(f"float32 matmul again at the end: {peak_after / 1e9:.1f} GFLOP/s (utilisation is against the first)")


if __name__ == "__main__":
    main()
