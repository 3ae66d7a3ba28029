r"""Prefix-diffusion (seed 003) on the synthetic shapes captions: the embedded default for this family.

What stands in for what: the paper's CLIP is the shapes vision-language model's CLIP (configs/coca_shapes.py,
exported by ``ladic-convert clip``: ``clip=DIR``); the BERT-base-shaped denoiser (12 x 768) is shrunk to
4 x 256 to train on 2 CPU cores in minutes. The 48-d learned embeddings, the 5 prefix tokens and the
truncated linear schedule are the paper's.

  ladic-train --config configs/prefix_diffusion_shapes.py:clip=runs/coca/clip --workdir runs/prefix \
      --config.input.data_dir=data

Variants: ``clip=DIR`` (the CLIP; without it a random one: a smoke test only), ``runlocal``, ``steps=N``,
``candidates=N`` (sampled per image and re-ranked by the CLIP's image-text cosine; 1: plain sampling).

Measured here (500 test images): 1500 steps in 13.1 min on 2 CPU cores, BLEU-4 0.419 with 5 candidates
(0.404 with one), 35.8 % of captions entirely right (README, "Status and figures").
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, clip="", candidates=5)
    c = ml_collections.ConfigDict()
    c.family = "prefix_diffusion"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        # The shortest reference as the training caption: fewer phrasings of one scene to average over.
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
        text=dict(pretrained=None, emb_dim=48, scale_embeddings=False, init_std=1.0),
        condition=dict(normalize=True),
        # k = 5 prefix tokens; the MLP's hidden width is half of k x width (ClipCap's mapping network).
        denoiser=dict(width=256, depth=4, num_heads=4, mlp_dim=1024, num_cond_tokens=5, cond_hidden=640,
                      fusion="concat", time_embedding=True, dropout=0.0),
        text_guidance=False, dedup_consecutive=False, vocab="train", max_vocab=128)
    c.diffusion = dict(schedule="trunc_lin", num_timesteps=1000)
    c.sampler = dict(steps=20, method="ddim", eta=0.0, guidance=0.0, clamp=True)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    # n candidates per image (the code: 20), the one of highest CLIP image-text cosine kept.
    c.sampler.mbr, c.sampler.mbr_metric = arg.candidates, "clip"

    c.total_steps = arg.steps or 1500
    c.num_epochs = 0
    c.stop_at_step = 0
    c.optim = dict(lr=1e-3, warmup=0.05, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                   frozen=[r"^clip/", r"^(emb_scale|vocab_ids)$"])
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
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.sampling_steps = (2,)
        c.sampler.mbr = 2
        c.eval.limit = 16
    return c
