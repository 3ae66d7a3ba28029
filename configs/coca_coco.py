r"""The CoCa-style vision-language model at real size on COCO captions (Karpathy splits): OpenAI's CLIP
ViT-B/32 (both towers, fine-tuned by the contrastive loss) plus a 12-block, 768-wide caption decoder — the
same blocks and sizes as the LaDiC paper's diffuser (configs/ladic_coco.py), so that its greedy decoding is
the "equal-size autoregressive" baseline of the papers' speed claims.

Needs the dataset prepared (below) and the CLIP checkpoint (and its tokenizer) as a local directory or a
cached hub id (nothing is downloaded unless the HF cache allows it):

  ladic-train --config configs/coca_coco.py --workdir gs://bucket/coca_coco \
      --config.input.data_dir=gs://bucket/tfds \
      --config.model.clip.pretrained=/ckpt/clip-vit-base-patch32 --config.input.tokenizer=/ckpt/clip-vit-base-patch32
  scripts/aot_check.py --config configs/coca_coco.py --topology v5e:4x4      # will it fit? (no weights needed)

Losses as CoCa (Yu et al. 2022): captioning weight 2, contrastive weight 1. The evaluation scores captions
with the model's own CLIP and measures its retrieval (``eval.clip="self"``); for CLIPScore with OpenAI's
CLIP, as papers report it: ``ladic-eval --workdir ... --config.eval.clip=openai/clip-vit-base-patch32
--config.eval.clip_prompt="A photo depicts "``.

Data (``data=``): ``coco`` (default), ``karpathy_captions/coco``, this project's builder over COCO's image
folders and Karpathy's ``dataset_coco.json`` (``ladic-data build karpathy_captions --config coco --manual_dir
DIR --data_dir DATA_DIR``; offline, local or gs:// files, every reference kept); or ``coco_captions``, TFDS's
own ``coco_captions/2014`` with the same Karpathy splits, which ``tfds build`` downloads (~20 GB) from the COCO
site. The first is the default because it builds from files a researcher already has, without network.

Variants: ``data=coco|coco_captions``, ``runlocal`` (tiny random towers, a few steps, no downloads: the smoke
test, run in the test suite on a tiny fake COCO in the true layout), ``steps=N``.
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.data.datasets import karpathy_input
from ladic_jax.distributed import config_section as distributed_section

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_ID = "openai/clip-vit-base-patch32"
MAX_LENGTH = 24


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0, data="coco")
    c = ml_collections.ConfigDict()
    c.family = "coca"
    c.seed = 0
    c.dtype = "float32"

    c.input = dict(
        **karpathy_input(arg.data), data_dir=None, eval_split="test",
        image_size=224, image_mean=CLIP_MEAN, image_std=CLIP_STD, max_length=MAX_LENGTH,
        tokenizer=CLIP_ID, random_resized_crop=True, crop_scale=(0.5, 1.0), flip=True,
        shuffle_buffer=20000, batch_size=512, eval_batch_size=512, seed=0, train_captions="sample")

    c.model = dict(
        # The sizes of openai/clip-vit-base-patch32, spelled out so that the model builds without the checkpoint
        # (scripts/aot_check.py); its config.json must agree when the weights are loaded.
        clip=dict(pretrained=CLIP_ID, config=dict(
            text=dict(vocab_size=49408, hidden_size=512, num_layers=12, num_heads=8, intermediate_size=2048,
                      max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=49407),
            vision=dict(image_size=224, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                        intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False, stem="patch"),
            projection_dim=512, logit_scale_init=2.6592)),
        decoder=dict(preset="base", overrides={}),
        contrastive="softmax", contrastive_weight=1.0, caption_weight=2.0,
        vocab="full", max_vocab=0)
    c.sampler = dict(steps=MAX_LENGTH - 1, method="greedy", beam_size=4, length_penalty=1.0)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps
    c.num_epochs = 10
    c.stop_at_step = 0  # > 0: stop there with a checkpoint (resumable), keeping the schedule of total_steps
    c.optim = dict(lr=5e-5, warmup=0.05, decay="cosine", end_lr_factor=0.0, weight_decay=0.05,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, frozen=[])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]

    c.log_every = 100
    c.checkpoint = dict(every_steps=2000, keep=3)
    c.eval = dict(every_steps=5000, at_end=True, sampling_steps=(MAX_LENGTH - 1,), limit=0, clip="self",
                  clip_prompt="A photo depicts ", clip_model_metrics=True)

    if arg.runlocal:
        c.total_steps = arg.steps or 2
        c.input.update(image_size=32, batch_size=8, eval_batch_size=8, shuffle_buffer=16, tokenizer="minilm")
        c.model.clip = dict(pretrained=None, config=dict(
            text=dict(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=102),
            vision=dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, hidden_act="quick_gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False, stem="patch"),
            projection_dim=16, logit_scale_init=2.6592))
        c.model.decoder = dict(preset="tiny", overrides=dict(width=64, depth=2, num_heads=2, mlp_dim=128))
        c.log_every = 1
        c.checkpoint.every_steps = 1
        c.eval.update(every_steps=0, limit=8)
    return c
