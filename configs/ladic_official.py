r"""LaDiC as the authors released it (wangyuchi369/LaDiC, DESIGN §4): the model variant that the
released PyTorch checkpoint converts into, forward for forward.

  ladic-convert official --checkpoint pytorch_model.bin --stats_dir LaDiC/datasets --workdir runs/official
  ladic-caption --workdir runs/official photos/ --json
  ladic-eval --workdir runs/official --sampling-steps 5,10 --config.input.data_dir=gs://bucket/tfds

How it differs from the paper default (configs/ladic_coco.py):
- text: BERT-base embeddings + layers 0..5 only (``space_encoder``); the release's "decoder half" runs
  no layer, so the MLM head (``lm_head``, untied, trainable) reads the latent directly: split_layer = 6
  = num_layers. Latent = (h - mean) / std with the shipped mean/std (no epsilon).
- special positions ([CLS], [SEP], [PAD]) hold the raw, unnormalised encoder output of "." and are
  trained towards the token "."; captions are cleaned up as the release does (postprocess "official").
- diffuser: preset ``official`` (BLIP "MED" BERT over [x_t ; x̂0], 1536 wide, 12 post-LN layers,
  16 heads, LayerNorm-ed sinusoidal time table, 512 position embeddings, output = first 768 channels).
- image: BLIP ViT-B/16 at 224 px (timm copy, LayerNorm eps 1e-6), all 197 tokens, frozen.
- classifier-free guidance against the tokens of an all-zero normalised image, w = 1.
- diffusion: linear betas with a leading 0 (ᾱ_0 = 1), noise factor 4 in training, 1 when sampling;
  the re-noising sampler calling the model at min(999, t + 5).

Training (fine-tuning the converted model) as the release's script runs it:
- no gradient clipping (the release's clip_grad_norm_ is commented out): ``optim.grad_clip = 0``;
- AdamW weight decay 0.01 on every trainable parameter, biases and LayerNorm parameters included (torch's
  AdamW over model.parameters()): ``optim.weight_decay_mask = "all"``;
- the frozen BERT encoder computes the x0 targets with dropout on (the release calls model.train() on the
  whole model; BERT's rate 0.1, so two encodings of one caption differ): ``model.text.target_dropout = 0.1``.
  This is the release's behaviour, not the paper's; every other config leaves it off.
- images resized as the release's torchvision transforms do, by PIL's bicubic filter (``input.resize =
  "pil_bicubic"``), in training and evaluation.

Every weight comes from the converted checkpoint, so the architecture is spelled out here and no
pretrained file is read; only the tokenizer ("bert-base-uncased", a hub id found in the local HF
cache or a local directory: --config.input.tokenizer=/path) is needed to encode and decode captions.

Not reproduced: the release's "30 steps" is a stride of 30 (34 model calls, t = 999, 969, ..., 9);
here ``sampler.steps = N`` uses stride 1000 // N and equals the release exactly when N divides 1000.

Data: ``karpathy_captions/coco`` (built by ``ladic-data build karpathy_captions --config coco --manual_dir
DIR --data_dir DATA_DIR``); ``data=coco_captions`` reads TFDS's own ``coco_captions/2014`` instead (same
Karpathy splits; see configs/ladic_coco.py).

Variants: ``runlocal`` (every size shrunk, the same tensor names: the conversion test and a smoke
test), ``steps=N`` (training steps when fine-tuning the converted model), ``data=coco|coco_captions``.
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.data.datasets import karpathy_input
from ladic_jax.distributed import config_section as distributed_section

FROZEN_TEXT = r"^text/(embeddings|layers_\d+)/"   # the space encoder; its MLM head trains
FROZEN_IMAGE = r"^image/"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 60 epochs of the 113,287 Karpathy train+restval images at batch 512, spelled out so that building the
# model never needs the dataset's size.
RELEASE_STEPS = 60 * 222


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, data="coco")
    c = ml_collections.ConfigDict()
    c.family = "ladic"
    c.seed = 0
    c.dtype = "float32"

    c.input = dict(
        **karpathy_input(arg.data), data_dir=None, eval_split="test",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, max_length=24,
        tokenizer="bert-base-uncased", random_resized_crop=True, crop_scale=(0.5, 1.0), flip=True,
        resize="pil_bicubic", shuffle_buffer=20000, batch_size=512, eval_batch_size=100, seed=0, train_captions="sample")

    c.model = dict(
        text=dict(pretrained=None, split_layer=6, target_dropout=0.1, config=dict(
            vocab_size=30522, hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072,
            max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")),
        image=dict(pretrained=None, kind="blip_vision", config=dict(
            image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
            intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-6, pre_norm=False,
            patch_bias=True, norm_all_tokens=True)),
        diffuser=dict(preset="official", overrides=dict(max_len=512)),
        special_latent="period_raw", latent_loss="l2", ce_weight=0.2, self_cond_prob=0.5, uncond_prob=0.1,
        stats_batches=50, dedup_consecutive=False, vocab="full", max_vocab=0,
        latent_std_eps=0.0, null_condition="zero_image", postprocess="official")
    c.diffusion = dict(schedule="official", num_timesteps=1000, noise_factor=4.0, sample_noise_factor=1.0)
    c.sampler = dict(steps=10, method="renoise", eta=0.0, guidance=1.0, self_cond=True, t_offset=5)

    c.total_steps = arg.steps or RELEASE_STEPS
    c.num_epochs = 0
    c.stop_at_step = 0  # > 0: stop there with a checkpoint (resumable), keeping the schedule of total_steps
    c.optim = dict(lr=5e-5, warmup=0.1, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   weight_decay_mask="all", b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0,
                   frozen=[FROZEN_TEXT, FROZEN_IMAGE, r"^latent_(mean|std)$", r"^diffuser/null_condition$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()  # multi-process runs: see ladic_jax/distributed.py
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]

    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(5, 10), limit=0,
                  clip="openai/clip-vit-base-patch32", clip_prompt="A photo depicts ", clip_model_metrics=False)

    if arg.runlocal:
        # The release's tensor names with every width shrunk: text/latent 16 (diffuser 32), FFNs 64,
        # 2 text layers, 1 ViT block on 32 px images (5 tokens), 2 diffuser layers; vocabulary and
        # position tables keep their sizes so that the real tokenizer decodes.
        c.total_steps = arg.steps or 2
        c.input.update(image_size=32, batch_size=4, eval_batch_size=4, shuffle_buffer=16, tokenizer="minilm")
        c.model.text.split_layer = 2
        c.model.text.config.update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=64)
        c.model.image.config.update(image_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                    intermediate_size=64)
        c.model.diffuser.overrides = dict(max_len=512, depth=2, num_heads=4, mlp_dim=64)
        c.model.stats_batches = 1
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(sampling_steps=(2,), limit=4, clip="")
        c.sampler.steps = 2
    return c
