"""ladic-convert: turn an external checkpoint into a ladic_jax run directory, or a run's pretrained towers
into a Hugging Face checkpoint directory.

  ladic-convert official --checkpoint pytorch_model.bin --stats_dir LaDiC/datasets --workdir runs/official
  ladic-convert clip --workdir runs/coca --out runs/coca/clip
  ladic-convert vqvae --workdir runs/vqvae --out runs/vqvae/vq
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ladic_jax.cli import common

# The repository's config of the release's model variant (present in a source checkout).
DEFAULT_OFFICIAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ladic_official.py"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ladic-convert", description="Convert an external checkpoint into a run "
                                "directory that ladic-eval, ladic-caption and ladic-train use as is.",
                                epilog=common.OVERRIDE_HELP)
    sub = p.add_subparsers(dest="source", required=True)
    o = sub.add_parser("official", help="the LaDiC authors' released PyTorch checkpoint",
                       description="Strict: every tensor of the checkpoint is used or deliberately ignored; a "
                       "missing, mis-shaped or unknown tensor stops the conversion naming it. The run's tokenizer "
                       "(config.input.tokenizer: the config's hub id, found in the local Hugging Face cache, or "
                       "--config.input.tokenizer=DIR) must load, or nothing is written.",
                       epilog=common.OVERRIDE_HELP)
    o.add_argument("--checkpoint", required=True, help="the release's pytorch_model.bin (read with "
                   "torch.load(weights_only=True))")
    o.add_argument("--stats_dir", "--stats-dir", required=True,
                   help="directory with the release's mean_emb_split.pickle and std_emb_split.pickle")
    o.add_argument("--workdir", required=True, help="output run directory (must hold no checkpoint yet)")
    o.add_argument("--config", default=None, metavar="FILE.py[:ARGS]",
                   help=f"the model variant's config (default: {DEFAULT_OFFICIAL_CONFIG})")
    c = sub.add_parser("clip", help="export the CLIP towers of a run (e.g. of configs/coca_shapes.py) in the "
                       "Hugging Face CLIP layout", description="Writes config.json, model.safetensors, the tokenizer "
                       "and preprocessor_config.json; other configs load the directory as pretrained weights "
                       "(e.g. configs/ladic_shapes.py:tower=DIR). With the patch stem, PyTorch "
                       "transformers.CLIPModel.from_pretrained loads it too.")
    v = sub.add_parser("vqvae", help="export the VQ-VAE of a run (configs/vqvae_shapes.py) as the image "
                       "tokenizer of the discrete family", description="Writes vqvae.json (sizes, image "
                       "normalisation) and model.safetensors; configs/mc_diffusion_shapes.py:vq=DIR loads it.")
    for sp in (c, v):
        sp.add_argument("--workdir", required=True, help="a run directory written by ladic-train")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    args, overrides = common.parse(p, argv)
    if overrides and args.source != "official":
        common.fail(f"ladic-convert {args.source} takes no config overrides (got --config.{overrides[0]}): it "
                    "exports the run as it was trained")
    common.setup_logging()
    if args.source in ("clip", "vqvae"):
        from ladic_jax.checkpoint import CheckpointError
        from ladic_jax import run_export
        export = run_export.export_clip_of_run if args.source == "clip" else run_export.export_vqvae_of_run
        try:
            path, step = export(args.workdir, args.out, step=args.step)
        except (FileNotFoundError, ValueError, CheckpointError) as e:
            common.fail(str(e))
        print(f"[convert] {'CLIP' if args.source == 'clip' else 'VQ-VAE'} of {args.workdir} step {step} -> {path}",
              flush=True)
        return
    spec = args.config or str(DEFAULT_OFFICIAL_CONFIG)
    if not args.config and not DEFAULT_OFFICIAL_CONFIG.exists():
        common.fail(f"{DEFAULT_OFFICIAL_CONFIG} not found (not a source checkout): pass --config "
                    "path/to/configs/ladic_official.py")
    from ladic_jax.official_checkpoint import convert_official
    try:
        config = common.load(spec, overrides)
        summary = convert_official(args.checkpoint, args.stats_dir, args.workdir, config)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    print(f"[convert] {args.checkpoint} -> {args.workdir}/checkpoints/0 "
          f"({len(summary['ignored'])} tensors ignored as unused by the release's forward)", flush=True)


if __name__ == "__main__":
    main()
