r"""The image tokenizer of MC-Diffusion on the synthetic shapes data: a small VQ-VAE (DESIGN §10; the paper
uses a pretrained VQGAN, which cannot be had offline). 64 px images -> 8x8 codes from a codebook of 256,
EMA codebook updates; trains on a 2-core CPU in a few minutes.

  ladic-data build shapes_captions --data_dir data
  ladic-train --config configs/vqvae_shapes.py --workdir runs/vqvae --config.input.data_dir=data
  ladic-convert vqvae --workdir runs/vqvae --out runs/vqvae/vq      # what configs/mc_diffusion_shapes.py loads

The evaluation reconstructs the test images: recon_mse, PSNR, codebook use, and
runs/vqvae/eval/reconstructions_step_<N>.png (originals beside reconstructions).

Variants: ``runlocal`` (a few steps, tiny eval: a smoke test), ``steps=N``, ``gradient`` (the codebook
learned by gradient through the codebook loss instead of EMA).
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section

EMA_STATE = r"^quantizer/(codebook|cluster_size|embed_sum)$"


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, gradient=False)
    c = ml_collections.ConfigDict()
    c.family = "vqvae"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=5000, batch_size=32, eval_batch_size=100, seed=0, train_captions="first")
    c.model = dict(channels=(32, 64, 64), num_res_blocks=1, embed_dim=32, num_codes=256,
                   codebook_update="gradient" if arg.gradient else "ema", commitment=0.25, ema_decay=0.99,
                   dead_code_threshold=0.1)
    c.sampler = dict(steps=1)  # unused: not a captioner
    c.total_steps = arg.steps or 1000
    c.num_epochs = 0
    c.stop_at_step = 0
    c.optim = dict(lr=2e-3, warmup=0.02, decay="cosine", end_lr_factor=0.05, weight_decay=0.0,
                   b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0,
                   frozen=[EMA_STATE])
    if arg.gradient:  # the EMA statistics are unused; keep them out of the optimizer
        c.optim.frozen = [r"^quantizer/(cluster_size|embed_sum)$"]
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r".*", "replicate")]
    c.log_every = 50
    c.checkpoint = dict(every_steps=500, keep=2)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(1,), limit=0, clip="")
    if arg.runlocal:
        c.total_steps = arg.steps or 4
        c.input.batch_size = 8
        c.input.eval_batch_size = 8
        c.input.shuffle_buffer = 64
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.limit = 16
    return c
