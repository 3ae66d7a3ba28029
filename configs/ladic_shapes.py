r"""LaDiC on the synthetic shapes captions: the embedded default, trains on a 2-core CPU in minutes.

Text space: the packaged MiniLM-L6 (real pretrained weights) split 3+3; image encoder: a small ViT
trained from scratch (no pretrained image weights are to be had offline); diffuser: "tiny".

  ladic-data build shapes_captions --data_dir data
  ladic-train --config configs/ladic_shapes.py --workdir runs/shapes \
      --config.input.data_dir=data
  ladic-train --config configs/ladic_shapes.py:runlocal --workdir /tmp/smoke --config.input.data_dir=data

Variants: ``runlocal`` (a few steps, tiny eval: a smoke test), ``steps=N`` (training steps),
``tower=DIR``: the image encoder is the pretrained image tower of the shapes vision-language model
(configs/coca_shapes.py, exported by ``ladic-convert clip`` in the Hugging Face CLIP layout), frozen, as the
paper freezes BLIP's ViT; its tokens are read after the tower's final LayerNorm, as its caption decoder read
them. Without it the ViT trains from scratch inside the diffusion loss (with the image-words loss).
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section


FROZEN_TEXT = r"^text/(embeddings|layers_\d+)/"  # the split BERT but its MLM head (the paper)


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, tower="")
    c = ml_collections.ConfigDict()
    c.family = "ladic"
    c.seed = 0
    c.dtype = "float32"

    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=32,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=5000, batch_size=32, eval_batch_size=100, seed=0, train_captions="first",
        train_caption_file="")

    split = 3
    c.model = dict(
        text=dict(pretrained="minilm", split_layer=split),
        image=dict(pretrained=None, kind="vit", config=dict(
            image_size=64, patch_size=8, hidden_size=128, num_layers=3, num_heads=4,
            intermediate_size=512, hidden_act="gelu", layer_norm_eps=1e-6, pre_norm=False,
            patch_bias=True, norm_all_tokens=True, stem="conv")),
        # Position embeddings drawn at std 1 (not 0.02): the projected noisy input is O(1) per channel and
        # drowns 0.02-scale positions, so at high t the model could not tell its 32 slots apart. Dropout off:
        # 700 steps over 10k images do not overfit. Measured at 700 steps on 200 test images, 5 steps:
        # BLEU-4 0.00 -> 0.155 (positions) -> 0.187 (+ conv stem, no dropout); see README.
        diffuser=dict(preset="tiny", overrides=dict(position_init_std=1.0, dropout=0.0,
                                                    attention_dropout=0.0)),
        special_latent="period", latent_loss="l2", ce_weight=0.2, self_cond_prob=0.5, uncond_prob=0.1,
        stats_batches=20, dedup_consecutive=False,
        # The shapes captions use ~45 words: score only those (a CPU-speed measure; COCO uses the full head).
        vocab="train", max_vocab=128,
        image_words_weight=0.1, input_scaling=True)
    # Training noise factor 4 as the authors' release: with factor 1 the 384-d MiniLM latents stay
    # recoverable from x_t for most t and the model learns to denoise text without looking at the image.
    c.diffusion = dict(schedule="cosine", num_timesteps=1000, noise_factor=4.0, sample_noise_factor=1.0)
    c.sampler = dict(steps=5, method="ddim", eta=0.0, guidance=1.0, self_cond=True, t_offset=0)
    # Back&Refine (paper §3.4: stop at t = at·T, keep the `keep` most confident positions, restart) and
    # Minimum Bayes Risk over `mbr` candidates per image (paper table 7); both off by default.
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps or 700
    c.num_epochs = 0
    c.stop_at_step = 0  # > 0: stop there with a checkpoint (resumable), keeping the schedule of total_steps
    c.optim = dict(lr=1e-3, warmup=0.05, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                   frozen=[FROZEN_TEXT, r"^(latent_(mean|std)|vocab_ids)$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()  # multi-process runs: see ladic_jax/distributed.py
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]

    c.log_every = 50
    c.checkpoint = dict(every_steps=500, keep=3)
    # CLIPScore with the shapes CLIP when one is given (tower=DIR, or --config.eval.clip=DIR); it was trained on
    # bare captions, so no "A photo depicts" prompt.
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(5, 30), limit=0, clip=arg.tower, clip_prompt="",
                  clip_model_metrics=False)

    if arg.tower:
        c.model.image = dict(pretrained=arg.tower, kind="clip_vision", config=None, normalize_tokens=True)
        c.model.image_words_weight = 0.0
        c.optim.frozen.append(r"^image/")

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
