r"""CLIP-DiffusionLM as in the paper (seed 000, DESIGN §5): Flickr8k, or Flickr30k+8k (the final model).

CLIP ViT-B/32 image feature (512-d, frozen) -> MLP -> one token concatenated after the caption with a
segment embedding; DistilBERT-base's frozen word embeddings (768-d) and a head tied to them; a
DistilBERT-shaped denoiser (6 layers, 768 wide) from random init; 16 tokens; cosine schedule, T = 1000;
x0-prediction with L'_simple + λ L_R; 15 epochs of AdamW; inference: 5 re-feed iterations, consecutive
repeats removed.

  final (default): λ = 0.5, lr linear 1e-4 -> 5e-5;  ``baseline``: λ = 0.3, lr 5e-5 constant.

Not in the paper, chosen here: batch 64, a timestep embedding (the authors' code feeds none:
``--config.model.denoiser.time_embedding=False``), the CLIP feature L2-normalised.

Datasets: ``karpathy_captions/flickr8k`` and ``karpathy_captions/flickr30k+8k``, this project's builders over
Karpathy's split files and the Flickr image folders (``ladic-data build karpathy_captions --config
flickr30k+8k --manual_dir DIR --data_dir DATA_DIR``; the union keeps a photo found in both sets once).

  ladic-train --config configs/clip_diffusionlm_flickr.py:data=flickr30k+8k --workdir gs://b/cdlm \
      --config.input.data_dir=gs://b/tfds --config.model.clip.pretrained=/ckpt/clip-vit-base-patch32 \
      --config.model.text.pretrained=/ckpt/distilbert-base-uncased

Variants: ``data=flickr8k|flickr30k+8k``, ``baseline``, ``runlocal`` (tiny random encoders on a tiny fake
Flickr8k in the true layout:
the smoke test), ``steps=N``.
"""

import dataclasses

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section
from ladic_jax.encoders.clip import CLIPConfig
from ladic_jax.evaluation.clip_score import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

# openai/clip-vit-base-patch32 (CLIPConfig's defaults), spelled out so that the model builds without the
# checkpoint (AOT checks); the checkpoint's config.json must agree when it is loaded.
CLIP_B32 = dataclasses.asdict(CLIPConfig())


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, data="flickr8k", baseline=False)
    c = ml_collections.ConfigDict()
    c.family = "clip_diffusionlm"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset=f"karpathy_captions/{arg.data}", data_dir=None, train_split="train", eval_split="test",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, max_length=16,
        tokenizer="distilbert-base-uncased", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=20000, batch_size=64, eval_batch_size=512, seed=0, train_captions="sample",
        train_caption_file="")
    c.model = dict(
        clip=dict(pretrained="openai/clip-vit-base-patch32", config=CLIP_B32),
        text=dict(pretrained="distilbert-base-uncased", emb_dim=768, vocab_size=30522, scale_embeddings=False),
        condition=dict(normalize=True),
        denoiser=dict(width=768, depth=6, num_heads=12, mlp_dim=3072, cond_hidden=768, fusion="concat",
                      time_embedding=True, dropout=0.1),
        text_guidance=False, uncond_prob=0.2,
        rounding_weight=0.3 if arg.baseline else 0.5, dedup_consecutive=True, stats_batches=20,
        vocab="full", max_vocab=0)
    c.diffusion = dict(schedule="cosine", num_timesteps=1000)
    c.sampler = dict(steps=5, method="refeed", eta=0.0, guidance=0.0, clamp=False)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps
    c.num_epochs = 15
    c.stop_at_step = 0
    if arg.baseline:
        c.optim = dict(lr=5e-5, warmup=0.0, decay="constant", end_lr_factor=1.0)
    else:
        c.optim = dict(lr=1e-4, warmup=0.0, decay="linear", end_lr_factor=0.5)
    c.optim.update(weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                   frozen=[r"^clip/", r"^words/", r"^(head_bias|emb_scale)$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(5,), limit=0, clip="self",
                  clip_prompt="A photo depicts ", clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 2
        c.num_epochs = 0
        c.input.update(image_size=32, batch_size=8, eval_batch_size=8, shuffle_buffer=16, tokenizer="minilm")
        c.model.clip.update(pretrained=None, config=dict(
            text=dict(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=102),
            vision=dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False),
            projection_dim=16))
        c.model.text.update(pretrained=None, emb_dim=32)
        c.model.denoiser.update(width=64, depth=2, num_heads=2, mlp_dim=128, cond_hidden=64)
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(sampling_steps=(2,), limit=8)
        c.sampler.steps = 2
    return c
