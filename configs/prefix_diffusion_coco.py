r"""Prefix-diffusion as in the paper (seed 003, DESIGN §6): COCO (Karpathy splits) or Flickr30k.

CLIP ViT-B/32 image feature (512-d, frozen) -> MLP (Linear-ReLU-Dropout-Linear) -> 5 prefix tokens with
their own position and segment embeddings, after the caption's up-projected noisy 48-d learned word
embeddings (the head tied to them); a BERT-base-shaped denoiser (12 layers, 768 wide) from scratch; 24
tokens; the truncated linear schedule (the paper's best); loss x0 MSE + decoder NLL + prior; DDIM with
clamping to the nearest embedding at every step; 20 candidates per image, the one of highest CLIP
image-text cosine kept.

Not in the paper, chosen here after Diffusion-LM (which its code forks): T = 2000, lr 1e-4 with linear
decay, batch 64, 50 DDIM steps; a timestep embedding; the CLIP feature L2-normalised; 10 epochs.

Datasets (``data=``): ``coco`` (default: ``karpathy_captions/coco``, train+restval) or ``flickr30k``
(``karpathy_captions/flickr30k``), this project's builders over Karpathy's split files and the image folders
(``ladic-data build karpathy_captions --config coco --manual_dir DIR --data_dir DATA_DIR``, offline); or
``coco_captions``, TFDS's own ``coco_captions/2014`` (the same splits; ``tfds build`` downloads it).

  ladic-train --config configs/prefix_diffusion_coco.py --workdir gs://b/prefix \
      --config.input.data_dir=gs://b/tfds --config.model.clip.pretrained=/ckpt/clip-vit-base-patch32

Variants: ``data=coco|flickr30k|coco_captions``, ``runlocal`` (tiny random encoders on a tiny fake dataset
in the true layout: the smoke test),
``steps=N``, ``candidates=N``.
"""

import dataclasses

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.data.datasets import karpathy_input
from ladic_jax.distributed import config_section as distributed_section
from ladic_jax.encoders.clip import CLIPConfig
from ladic_jax.evaluation.clip_score import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

# openai/clip-vit-base-patch32 (CLIPConfig's defaults), spelled out so that the model builds without the
# checkpoint (AOT checks); the checkpoint's config.json must agree when it is loaded.
CLIP_B32 = dataclasses.asdict(CLIPConfig())


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, data="coco", candidates=20)
    c = ml_collections.ConfigDict()
    c.family = "prefix_diffusion"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        **karpathy_input(arg.data), data_dir=None, eval_split="test",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, max_length=24,
        tokenizer="bert-base-uncased", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=20000, batch_size=64, eval_batch_size=512, seed=0, train_captions="sample",
        train_caption_file="")
    c.model = dict(
        clip=dict(pretrained="openai/clip-vit-base-patch32", config=CLIP_B32),
        text=dict(pretrained=None, emb_dim=48, vocab_size=30522, scale_embeddings=False, init_std=1.0),
        condition=dict(normalize=True),
        # ClipCap's mapping network: hidden width half of k x width.
        denoiser=dict(width=768, depth=12, num_heads=12, mlp_dim=3072, num_cond_tokens=5, cond_hidden=1920,
                      fusion="concat", time_embedding=True, dropout=0.1),
        text_guidance=False, dedup_consecutive=False, vocab="full", max_vocab=0)
    c.diffusion = dict(schedule="trunc_lin", num_timesteps=2000)
    c.sampler = dict(steps=50, method="ddim", eta=0.0, guidance=0.0, clamp=True)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = arg.candidates, "clip"

    c.total_steps = arg.steps
    c.num_epochs = 10
    c.stop_at_step = 0
    c.optim = dict(lr=1e-4, warmup=0.0, decay="linear", end_lr_factor=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
                   eps=1e-8, grad_clip=1.0, frozen=[r"^clip/", r"^emb_scale$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(50,), limit=0, clip="self",
                  clip_prompt="A photo depicts ", clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 2
        c.num_epochs = 0
        c.input.update(train_split="train", image_size=32, batch_size=8, eval_batch_size=8, shuffle_buffer=16,
                       tokenizer="minilm")
        c.model.clip.update(pretrained=None, config=dict(
            text=dict(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=102),
            vision=dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False),
            projection_dim=16))
        c.model.text.update(emb_dim=16)
        c.model.denoiser.update(width=64, depth=2, num_heads=2, mlp_dim=128, cond_hidden=160)
        c.sampler.mbr = 2
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(sampling_steps=(2,), limit=8)
        c.sampler.steps = 2
    return c
