"""The papers' central claim, measured here: seconds per caption against caption length, diffusion against
autoregressive decoding.

  python scripts/length_benchmark.py [--lengths 8,16,24,32,48,64] [--batches 1,16] [--out docs/length_latency]

LaDiC as in the paper (configs/ladic_coco.py: diffuser 12 blocks x 768, classifier-free guidance, so two
denoiser passes per step) at 5 and 30 steps, against the equal-size autoregressive captioner
(configs/coca_coco.py: a decoder of the same 12 blocks x 768, greedy, key/value cache, one token per step),
random weights (timing does not depend on them), both with the same 30522-word vocabulary (the packaged
MiniLM tokenizer). Each caption is decoded to the full length L (the diffusion model always denoises all L
positions; the autoregressive loop runs L - 1 steps whatever it emits).

The two image encoders differ (LaDiC's BLIP ViT-B/16: 197 tokens; the captioner's CLIP ViT-B/32: 50), so the
sampling context (image encoder, cross-attention keys/values) is timed on its own program and the table gives
both the whole call and the decoding alone (whole - context); the crossing points are read on the decoding.
Programs are compiled ahead of time and the compiled executables timed (after a warm-up call, at least 2 s
of calls and at least 2 calls; a call longer than 2 s is timed once). Writes OUT.json (every figure) and OUT.png (the plot), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name: (config, sampling steps or None for the config's own)
    "LaDiC, 5 steps": ("configs/ladic_coco.py", 5),
    "LaDiC, 30 steps": ("configs/ladic_coco.py", 30),
    "autoregressive (greedy, KV cache)": ("configs/coca_coco.py", None),
}


def _seconds(fn, *args, budget: float = 2.0) -> float:
    """Mean seconds per call of a compiled executable: calls until `budget` seconds have passed (at least 2),
    after one warm-up call -- unless that call alone took the budget, when it is the figure (an executable
    compiled ahead of time does not compile on its first call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    if first >= budget:
        return first
    times = []
    while len(times) < 2 or sum(times) < budget:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def _config(path: str, length: int, batch: int):
    from ladic_jax import config as config_lib

    cfg = config_lib.load_config(os.path.join(REPO, path))
    with cfg.unlocked():
        cfg.input.update(tokenizer="minilm", max_length=length, eval_batch_size=batch)
        cfg.total_steps = 1  # the training schedule's length (from the dataset's size otherwise) is not used
        if cfg.family == "coca":
            cfg.model.clip.pretrained = None
            cfg.model.clip.config.text.update(vocab_size=30522, eos_token_id=102)
            cfg.sampler.steps = length - 1
            cfg.eval.sampling_steps = (length - 1,)
        else:
            cfg.model.text.pretrained = None
            cfg.model.image.pretrained = None
    return cfg


def measure(path: str, steps: int | None, length: int, batch: int) -> dict:
    from ladic_jax import cost as cost_lib
    from ladic_jax import sampler as sampler_lib
    from ladic_jax import trainer
    from ladic_jax.evaluation.evaluator import sampler_config

    cfg = _config(path, length, batch)
    sk = trainer.skeleton(cfg, check_batches=False)
    params = jax.jit(sk.init_fn)(jax.random.key(0))
    scfg = sampler_config(cfg, steps=steps) if steps else sampler_config(cfg)
    size = cfg.input.image_size
    batch_arrays = {"image": np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)}
    key = jax.random.key(0)
    program = sampler_lib.make_sample_fn(sk.family, scfg).lower(params, batch_arrays, key).compile()
    ctx_fn, ctx_args = cost_lib.phase_programs(sk.family, scfg, params, batch_arrays, key)["context"]
    context = ctx_fn.lower(*ctx_args).compile()
    total = _seconds(program, params, batch_arrays, key)
    ctx = _seconds(context, *ctx_args)
    return {"length": length, "batch": batch, "loop_steps": len(sampler_lib.loop_timesteps(sk.family, scfg)),
            "seconds_per_caption": total / batch, "context_seconds_per_caption": ctx / batch,
            "decode_seconds_per_caption": (total - ctx) / batch}


def crossing(lengths, diffusion, autoregressive) -> float | None:
    """The caption length from which diffusion decodes faster (linear between grid points; None: never)."""
    d = np.asarray(diffusion) - np.asarray(autoregressive)
    for i in range(len(lengths)):
        if d[i] < 0:
            if i == 0:
                return float(lengths[0])
            return float(lengths[i - 1] + (lengths[i] - lengths[i - 1]) * d[i - 1] / (d[i - 1] - d[i]))
    return None


def plot(results: dict, batches, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for name, rows in results.items():
            rows = [r for r in rows if r["batch"] == batch]
            x = [r["length"] for r in rows]
            line, = ax.plot(x, [r["decode_seconds_per_caption"] for r in rows], "o-", label=f"{name}: decoding")
            ax.plot(x, [r["seconds_per_caption"] for r in rows], "--", color=line.get_color(), alpha=0.5,
                    label=f"{name}: with image encoder")
        ax.set_xlabel("caption length (tokens)")
        ax.set_ylabel("seconds per caption")
        ax.set_title(f"batch {batch}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Diffusion (LaDiC) vs autoregressive captioning, equal-size decoders, this CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8,16,24,32,48,64")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "length_latency"),
                   help="writes OUT.json and OUT.png (default: %(default)s)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    results = {name: [] for name in MODELS}
    for batch in batches:
        for length in lengths:
            for name, (path, steps) in MODELS.items():
                r = measure(path, steps, length, batch)
                results[name].append(r)
                print(f"batch {batch:3d} length {length:3d} {name:<36} {r['seconds_per_caption']:8.4f} s/caption "
                      f"(decoding {r['decode_seconds_per_caption']:.4f})", flush=True)
    ar = list(MODELS)[-1]
    summary = {}
    print("\n| batch | length | " + " | ".join(f"{n} (s/caption, decoding)" for n in MODELS) + " |")
    print("|---|---|" + "---|" * len(MODELS))
    for batch in batches:
        for length in lengths:
            cells = [next(r for r in results[n] if r["batch"] == batch and r["length"] == length) for n in MODELS]
            print(f"| {batch} | {length} | " + " | ".join(
                f"{c['seconds_per_caption']:.4f} ({c['decode_seconds_per_caption']:.4f})" for c in cells) + " |")
        for name in list(MODELS)[:-1]:
            rows = [r for r in results[name] if r["batch"] == batch]
            ar_rows = [r for r in results[ar] if r["batch"] == batch]
            x = crossing(lengths, [r["decode_seconds_per_caption"] for r in rows],
                         [r["decode_seconds_per_caption"] for r in ar_rows])
            summary[f"batch {batch}, {name}"] = x
    print()
    for k, x in summary.items():
        print(f"{k}: decodes faster than autoregressive from length "
              f"{'never (within the grid)' if x is None else f'{x:.1f}'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "results": results,
                   "crossings": summary}, f, indent=1)
    plot(results, batches, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
