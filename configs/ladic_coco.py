r"""LaDiC as in the paper (seed 001, DESIGN §4) on COCO captions, Karpathy splits.

BLIP ViT-B/16 at 224 px (frozen), BERT-base split 6+6 (frozen; MLM head trainable), diffuser `base`
(12 blocks, 768 wide), AdamW 5e-5 with 10% warmup and linear decay, 60 epochs of global batch 512,
λ = 0.2, classifier-free guidance (p = 0.1 in training, w = 1), self-conditioning p = 0.5, 24 tokens.

Needs the dataset prepared (below) and the two pretrained encoders as local directories or cached hub ids
(nothing is downloaded unless the HF cache allows it):

  ladic-train --config configs/ladic_coco.py --workdir gs://bucket/ladic_coco \
      --config.input.data_dir=gs://bucket/tfds \
      --config.model.text.pretrained=/ckpt/bert-base-uncased \
      --config.model.image.pretrained=/ckpt/blip-image-captioning-base

Data (``data=``): ``coco`` (default), ``karpathy_captions/coco``, this project's builder over COCO's image
folders and Karpathy's ``dataset_coco.json`` (``ladic-data build karpathy_captions --config coco --manual_dir
DIR --data_dir DATA_DIR``; offline, local or gs:// files, every reference kept); or ``coco_captions``, TFDS's
own ``coco_captions/2014`` with the same Karpathy splits, which ``tfds build`` downloads (~20 GB) from the COCO
site. The first is the default because it builds from files a researcher already has, without network.

Variants: ``data=coco|coco_captions``, ``runlocal`` (tiny random encoders, a few steps, no downloads: the
smoke test, run in the test suite on a tiny fake COCO in the true layout), ``steps=N``.

Faithfulness notes: the paper's noise schedule is "cosine with a noise factor" and its sampler DDIM;
the authors' release instead uses linear betas with a training noise factor of 4 and a re-noising
sampler called at t+5: set diffusion.schedule="official", diffusion.noise_factor=4.0,
sampler.method="renoise", sampler.t_offset=5 and model.special_latent="period" to follow it.
configs/ladic_official.py is the release's model as a whole (what `ladic-convert official` imports).
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.data.datasets import karpathy_input
from ladic_jax.distributed import config_section as distributed_section

FROZEN_TEXT = r"^text/(embeddings|layers_\d+)/"   # BERT frozen but its MLM head
FROZEN_IMAGE = r"^image/"                          # the BLIP ViT is frozen
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        # eval_batch_size: a power of two, so that it splits over any slice of up to 512 chips (500
        # split over neither 8 nor 16 chips: scripts/aot_check.py); the last batch is padded and masked.
        shuffle_buffer=20000, batch_size=512, eval_batch_size=512, seed=0, train_captions="sample")

    c.model = dict(
        # The architectures are spelled out (BERT-base uncased; BLIP ViT-B/16 at 224 px, 197 tokens) so
        # that the model can be built without the checkpoints (scripts/aot_check.py); the checkpoints'
        # config.json must agree with them when the weights are loaded.
        text=dict(pretrained="bert-base-uncased", split_layer=6, config=dict(
            vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
            max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")),
        image=dict(pretrained="Salesforce/blip-image-captioning-base", kind="blip_vision", subtree="",
                   config=dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-5,
                               pre_norm=False, patch_bias=True, norm_all_tokens=True)),
        diffuser=dict(preset="base", overrides={}),
        special_latent="zero", latent_loss="l2", ce_weight=0.2, self_cond_prob=0.5, uncond_prob=0.1,
        stats_batches=50, dedup_consecutive=False, vocab="full", max_vocab=0)
    c.diffusion = dict(schedule="cosine", num_timesteps=1000, noise_factor=1.0, sample_noise_factor=1.0)
    c.sampler = dict(steps=30, method="ddim", eta=0.0, guidance=1.0, self_cond=True, t_offset=0)
    # Back&Refine (paper §3.4: stop at t = at·T, keep the `keep` most confident positions, restart) and
    # Minimum Bayes Risk over `mbr` candidates per image (paper table 7); both off by default.
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps
    c.num_epochs = 60
    c.stop_at_step = 0  # > 0: stop there with a checkpoint (resumable), keeping the schedule of total_steps
    # The paper gives AdamW at 5e-5 and no clipping or decay details: decay on matrices only and clipping at 1.0
    # are this project's defaults (configs/ladic_official.py trains as the release does: "all", no clipping).
    c.optim = dict(lr=5e-5, warmup=0.1, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   weight_decay_mask="matrices", b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                   frozen=[FROZEN_TEXT, FROZEN_IMAGE, r"^latent_(mean|std)$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()  # multi-process runs: see ladic_jax/distributed.py
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]

    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    # CLIPScore / RefCLIPScore (DESIGN §8) with OpenAI's CLIP ViT-B/32 (a local directory or a cached hub id).
    c.eval = dict(every_steps=10000, at_end=True, sampling_steps=(5, 30), limit=0,
                  clip="openai/clip-vit-base-patch32", clip_prompt="A photo depicts ", clip_model_metrics=False)

    if arg.runlocal:
        c.total_steps = arg.steps or 2
        c.input.update(image_size=32, batch_size=8, eval_batch_size=8, shuffle_buffer=16, tokenizer="minilm")
        c.model.text = dict(pretrained=None, split_layer=1, config=dict(
            vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            max_position_embeddings=64))
        c.model.image = dict(pretrained=None, kind="blip_vision", config=dict(
            image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            hidden_act="gelu", layer_norm_eps=1e-5, pre_norm=False, patch_bias=True, norm_all_tokens=True))
        c.model.diffuser = dict(preset="tiny", overrides=dict(width=64, depth=2, num_heads=2, mlp_dim=128))
        c.model.stats_batches = 1
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(every_steps=0, sampling_steps=(2,), limit=8, clip="")
        c.sampler.steps = 2
    return c
