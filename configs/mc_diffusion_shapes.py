r"""MC-Diffusion (seed 002) on the synthetic shapes captions: the embedded default for the discrete family.

What stands in for what: the paper's pretrained VQGAN (32x32 codes of 2886 from 256 px) is the small VQ-VAE
trained on the shapes images (configs/vqvae_shapes.py: 8x8 codes of 256 from 64 px; ``vq=DIR``, its export
by ``ladic-convert vqvae``); the 18 x 512 decoder is the diffuser's "tiny" preset (3 x 256). T = 100 as the
paper; MCS with P_cond = P_mask = 0.1 and, for the classifier-free comparison on the same model, a null
condition with probability 0.1.

  ladic-train --config configs/vqvae_shapes.py --workdir runs/vqvae --config.input.data_dir=data
  ladic-convert vqvae --workdir runs/vqvae --out runs/vqvae/vq
  ladic-train --config configs/mc_diffusion_shapes.py:vq=runs/vqvae/vq,clip=runs/coca/clip \
      --workdir runs/mc --config.input.data_dir=data

Variants: ``vq=DIR`` (the image tokenizer; without it a random tiny VQ-VAE: a smoke test only), ``clip=DIR``
(a CLIP to score CLIPScore with, e.g. the shapes VLM's), ``runlocal``, ``steps=N``, ``absorbing`` (the
absorbing-state process instead of mask-and-replace), ``learned_codes`` (a code embedding table instead of
a projection of the VQ codebook).
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, vq="", clip="", absorbing=False, learned_codes=False)
    c = ml_collections.ConfigDict()
    c.family = "mc_diffusion"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        # The shortest reference as the training caption (as for the other non-autoregressive families).
        shuffle_buffer=5000, batch_size=64, eval_batch_size=100, seed=0, train_captions="shortest",
        train_caption_file="")
    tokenizer = dict(path=arg.vq) if arg.vq else dict(
        kind="vqvae", config=dict(channels=(8, 8, 8), num_res_blocks=0, embed_dim=8, num_codes=16))
    c.model = dict(
        image_tokenizer=tokenizer,
        code_embedding="learned" if arg.learned_codes else "codebook",
        # The training images' codes computed once and kept with the parameters (5000 x 64), not every step.
        # Two self-attention blocks over the 64 code tokens: the small VQ-VAE is convolutional, its codes see
        # only their 8x8 patch (the paper's VQGAN encoder has attention). Without them, 2000 steps: BLEU-4 0.320
        # (T = 100, r = 1); with them, 2500 steps: 0.340 (not a controlled comparison: the lengths differ).
        code_encoder_depth=2,
        denoiser=dict(preset="tiny", overrides=dict(dropout=0.0, attention_dropout=0.0)),
        vocab="train", max_vocab=128,
        diffusion=dict(num_timesteps=100, kind="absorbing" if arg.absorbing else "mask_replace",
                       timestep_sampling="importance", min_count=10),
        aux_weight=1.0, p_cond=0.1, p_mask=0.1, p_null=0.1)
    # truncation 0.5: x̂0 cut to its top half of probability mass before each step (VQ-Diffusion's truncation
    # sampling). This config's run (2500 steps, 500 test images): BLEU-4 0.340 -> 0.380 at T = 100 and
    # 0.309 -> 0.375 at 10 steps for r = 1 -> 0.5 (the run without code-encoder blocks, 200 images, 10 steps:
    # 0.30 / 0.33 / 0.38 / 0.39 at r = 1 / 0.85 / 0.5 / 0.2).
    c.sampler = dict(steps=100, guidance=1.0, guidance_kind="mcs", mcs_mask_rate=0.1, mcs_literal=False,
                     truncation=0.5)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    # 10 candidates per image, the one of highest mean BLEU agreement with the others kept (MBR, the shared
    # candidate machinery): BLEU-4 0.375 / 0.391 / 0.415 with 1 / 5 / 10 candidates (10 steps, 500 test images).
    c.sampler.mbr, c.sampler.mbr_metric = 10, "bleu"

    c.total_steps = arg.steps or 2500
    c.num_epochs = 0
    c.stop_at_step = 0
    c.optim = dict(lr=1e-3, warmup=0.05, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   b1=0.9, b2=0.96, eps=1e-8, grad_clip=1.0,
                   frozen=[r"^image_tokenizer/", r"^(vocab_ids|loss_history|loss_counts)$"])
    # The frozen VQ-VAE codes of each training image computed once (ladic_jax/feature_cache.py).
    c.feature_cache = dict(kind="memory", dir="")
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
    c.log_every = 50
    c.checkpoint = dict(every_steps=500, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(100, 10), limit=0, clip=arg.clip, clip_prompt="",
                  clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 4
        c.input.batch_size = 8
        c.input.eval_batch_size = 8
        c.input.shuffle_buffer = 64
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.sampling_steps = (4,)
        c.sampler.steps = 4
        c.eval.limit = 16
        c.sampler.mbr = 1
    return c
