r"""CLIP-DiffusionLM (seed 000) on the synthetic shapes captions: the embedded default for this family.

What stands in for what: the paper's CLIP ViT-B/32 is the shapes vision-language model's CLIP
(configs/coca_shapes.py, exported by ``ladic-convert clip``: ``clip=DIR``); DistilBERT-base's frozen 768-d
word embeddings and LM head are the packaged MiniLM-L6's 384-d word embeddings with a head tied to them;
the DistilBERT-shaped denoiser (6 x 768) is shrunk to 4 x 256 to train on 2 CPU cores in minutes.

  ladic-train --config configs/clip_diffusionlm_shapes.py:clip=runs/coca/clip --workdir runs/cdlm \
      --config.input.data_dir=data

Variants: ``clip=DIR`` (the CLIP; without it a random one: a smoke test only), ``runlocal``, ``steps=N``,
``fusion=add`` (the paper's other fusion).

Measured here (500 test images): 1800 steps in 12.1 min on 2 CPU cores, BLEU-4 0.455, 35.8 % of captions
entirely right (README, "Status and figures").
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, clip="", fusion="concat")
    c = ml_collections.ConfigDict()
    c.family = "clip_diffusionlm"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        # The shortest reference as the training caption: fewer phrasings of one scene to average over (a
        # non-autoregressive model's prediction blurs between them).
        shuffle_buffer=5000, batch_size=64, eval_batch_size=100, seed=0, train_captions="shortest",
        train_caption_file="")
    c.model = dict(
        # The shapes CLIP's sizes come from its config.json; without one, a tiny random CLIP (smoke tests).
        clip=dict(pretrained=arg.clip or None, config=None if arg.clip else dict(
            text=dict(vocab_size=30522, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                      max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=102),
            vision=dict(image_size=64, patch_size=16, hidden_size=64, num_layers=1, num_heads=2,
                        intermediate_size=128, hidden_act="gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False, stem="patch"),
            projection_dim=64)),
        # Raw (unscaled) embeddings, as the paper: scaled to unit RMS the text stays recoverable from x_t for
        # most t and the model learns to denoise it without reading the image (8 memorised tiny images: 0/8
        # decoded vs 4-6/8 raw after 600 steps).
        text=dict(pretrained="minilm", emb_dim=384, scale_embeddings=False),
        condition=dict(normalize=True),
        denoiser=dict(width=256, depth=4, num_heads=4, mlp_dim=1024, cond_hidden=256, fusion=arg.fusion,
                      time_embedding=True, dropout=0.0),
        text_guidance=False, uncond_prob=0.2,
        rounding_weight=0.5, dedup_consecutive=True, stats_batches=20, vocab="train", max_vocab=128)
    c.diffusion = dict(schedule="cosine", num_timesteps=1000)
    # DDIM with clamping: BLEU-4 0.374 at 20 steps (200 test images, 1500 training steps) vs 0.358 for DDIM 5
    # steps unclamped and 0.28 for the paper's 5 re-feed iterations (method="refeed", steps=5).
    c.sampler = dict(steps=20, method="ddim", eta=0.0, guidance=0.0, clamp=True)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps or 1800
    c.num_epochs = 0
    c.stop_at_step = 0
    c.optim = dict(lr=1e-3, warmup=0.05, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                   frozen=[r"^clip/", r"^words/", r"^(head_bias|emb_scale|vocab_ids)$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
    c.log_every = 50
    c.checkpoint = dict(every_steps=500, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(20,), limit=0, clip="self", clip_prompt="",
                  clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 4
        c.input.batch_size = 8
        c.input.eval_batch_size = 8
        c.input.shuffle_buffer = 64
        c.model.stats_batches = 2
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.sampling_steps = (2,)
        c.eval.limit = 16
    return c
