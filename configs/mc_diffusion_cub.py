r"""MC-Diffusion as in the paper (seed 002, DESIGN §7): CUB-200 with ten captions per image.

Image tokenizer: a pretrained VQGAN, frozen: 32x32 codes from 256 px images with a codebook of 2886 (the
paper's; VQ-Diffusion's pruned OpenImages f8 VQGAN), given as a diffusers ``VQModel`` directory
(``vqgan=DIR``; a taming-transformers checkpoint is converted to that layout by diffusers' script, see
ladic_jax/encoders/vqgan.py). Code tokens: a learned table (paper: "embedded"). Decoder: 18 transformer blocks
of width 512 (8 heads, MLP 2048), cross-attending to the 1024 code tokens: ~122M trainable parameters with
the CLIP tokenizer's 49408 classes (Algorithm 1 encodes captions with CLIP's text side). Discrete diffusion:
mask-and-replace, T = 100, VLB + auxiliary x0 cross-entropy. MCS: P_cond = P_mask = 0.1 (and a null
condition, P = 0.1, for the classifier-free comparison on the same model). AdamW β = (0.9, 0.96), lr from
1e-6 to 4.5e-4 over 1000 warmup steps, then constant (the paper gives no decay); batch 128; 200 epochs.

Dataset: ``cub_captions/unseen_classes``: CUB_200_2011 images with Reed et al.'s ten captions each, in Reed
et al.'s class split (8,855 train / 2,933 test images: the paper's "over 8k training images and 3k test
images"; ``split=cub`` takes CUB's own image split, 5,994 / 5,794, instead). Built offline from the files
(``ladic-data build cub_captions --config unseen_classes --manual_dir DIR --data_dir DATA_DIR``). Evaluation
against all ten references.

  ladic-train --config configs/mc_diffusion_cub.py:vqgan=/ckpt/vqgan_f8_2886 --workdir gs://b/mc \
      --config.input.data_dir=gs://b/tfds --config.input.tokenizer=/ckpt/clip-vit-base-patch32

Variants: ``vqgan=DIR`` (without it: the paper's sizes, randomly initialised — for AOT fit checks only),
``runlocal`` (a tiny random VQGAN and decoder on a tiny fake CUB in the true layout: the smoke test),
``split=classes|cub``, ``steps=N``.
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section

# The f8 VQGAN's encoder in diffusers VQModel fields (taming: ch 128, ch_mult 1,2,2,4, 2 res blocks, attention
# at 32 px, z 4); its codebook pruned to the 2886 codes VQ-Diffusion kept.
VQGAN_F8 = dict(_class_name="VQModel", in_channels=3, block_out_channels=(128, 256, 256, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",), latent_channels=4,
                norm_num_groups=32, num_vq_embeddings=2886, vq_embed_dim=4, act_fn="silu")


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, vqgan="", split="classes")
    if arg.split not in ("classes", "cub"):
        raise ValueError(f"split={arg.split!r}: choose classes (Reed et al.'s, the paper's) or cub (CUB's own)")
    c = ml_collections.ConfigDict()
    c.family = "mc_diffusion"
    c.seed = 0
    c.dtype = "float32"
    c.input = dict(
        dataset="cub_captions/" + ("unseen_classes" if arg.split == "classes" else "default"), data_dir=None,
        train_split="train", eval_split="test",
        image_size=256, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="openai/clip-vit-base-patch32", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=10000, batch_size=128, eval_batch_size=128, seed=0, train_captions="sample",
        train_caption_file="")
    c.model = dict(
        image_tokenizer=dict(path=arg.vqgan) if arg.vqgan else dict(kind="vqgan", config=VQGAN_F8),
        code_embedding="learned",
        # True: the training images' 32x32 codes computed once (8855 x 1024, 36 MB per chip) instead of the
        # VQGAN encoder's forward on every step.
        denoiser=dict(preset="small", overrides=dict(depth=18, dropout=0.1, attention_dropout=0.1)),
        vocab="full", max_vocab=0, vocab_size=49408,  # CLIP's BPE ids (stated: builds without the tokenizer)
        diffusion=dict(num_timesteps=100, kind="mask_replace", timestep_sampling="importance", min_count=10),
        aux_weight=1.0, p_cond=0.1, p_mask=0.1, p_null=0.1)
    c.sampler = dict(steps=100, guidance=1.0, guidance_kind="mcs", mcs_mask_rate=0.1, mcs_literal=False,
                     truncation=1.0)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps or 0
    c.num_epochs = 0 if arg.steps else 200
    c.stop_at_step = 0
    c.optim = dict(lr=4.5e-4, warmup=1000, warmup_init_lr=1e-6, decay="constant", end_lr_factor=1.0,
                   weight_decay=0.01, b1=0.9, b2=0.96, eps=1e-8, grad_clip=1.0,
                   frozen=[r"^image_tokenizer/", r"^(loss_history|loss_counts)$"])
    # The frozen VQGAN codes of each training image computed once: 8,855 x 1024 int32 = 36 MB per host
    # (ladic_jax/feature_cache.py); the VQGAN encoder at 256 px is a large part of a step without it.
    c.feature_cache = dict(kind="memory", dir="")
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]
    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(100,), limit=0, clip="", clip_prompt="A photo depicts ",
                  clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 2
        c.num_epochs = 0
        c.input.update(image_size=32, batch_size=8, eval_batch_size=8, shuffle_buffer=16, tokenizer="minilm")
        c.model.vocab_size = 30522
        c.model.image_tokenizer = dict(kind="vqgan", config=dict(
            VQGAN_F8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), num_vq_embeddings=32))
        c.model.denoiser.overrides = dict(width=64, depth=2, num_heads=2, mlp_dim=128, dropout=0.0,
                                          attention_dropout=0.0)
        c.optim.warmup = 0
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(sampling_steps=(2,), limit=8)
        c.sampler.steps = 2
    return c
