r"""The shapes vision-language model (CoCa-style): contrastive + captioning pretraining on the synthetic
shapes captions. The embedded default's stand-in for the pretrained encoders of the papers (DESIGN §10):
its image tower, exported in the Hugging Face CLIP layout, is what LaDiC freezes (as the paper freezes
BLIP's ViT), and its caption decoder is the autoregressive baseline (the same blocks and sizes as
configs/ladic_shapes.py's diffuser: 3 blocks, 256 wide).

  ladic-data build shapes_captions --data_dir data
  ladic-train --config configs/coca_shapes.py --workdir runs/coca --config.input.data_dir=data
  ladic-convert clip --workdir runs/coca --out runs/coca/clip      # the towers, HF CLIP layout
  ladic-train --config configs/ladic_shapes.py:tower=runs/coca/clip --workdir runs/ladic ...

Variants: ``runlocal`` (a few steps, tiny eval: a smoke test), ``steps=N`` (training steps).
"""

import ml_collections

from ladic_jax.config import parse_arg
from ladic_jax.distributed import config_section as distributed_section

MAX_LENGTH = 32


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=0)
    c = ml_collections.ConfigDict()
    c.family = "coca"
    c.seed = 0
    c.dtype = "float32"

    c.input = dict(
        dataset="shapes_captions/default", data_dir=None, train_split="train", eval_split="test",
        image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=MAX_LENGTH,
        tokenizer="minilm", random_resized_crop=False, crop_scale=(0.5, 1.0), flip=False,
        shuffle_buffer=5000, batch_size=64, eval_batch_size=100, seed=0, train_captions="sample")

    c.model = dict(
        clip=dict(pretrained=None, config=dict(
            # A CLIP text tower from scratch over the MiniLM (BERT) WordPiece ids, pooled at [SEP] (id 102).
            text=dict(vocab_size=30522, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                      max_position_embeddings=MAX_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
                      eos_token_id=102),
            # The image tower of configs/ladic_shapes.py, in CLIP's variant (pre-LayerNorm on the embeddings).
            vision=dict(image_size=64, patch_size=8, hidden_size=128, num_layers=3, num_heads=4,
                        intermediate_size=512, hidden_act="gelu", layer_norm_eps=1e-5, pre_norm=True,
                        patch_bias=False, norm_all_tokens=False, stem="conv"),
            projection_dim=128)),
        decoder=dict(preset="tiny", overrides=dict(dropout=0.0, attention_dropout=0.0)),
        contrastive="softmax", contrastive_weight=1.0, caption_weight=1.0,
        # The CLIP-conditioned families read only the pooled embedding: teach it the whole caption (on this
        # data contrast alone leaves shapes out of it: zero-shot shape accuracy at chance without this).
        pooled_caption_weight=1.0,
        vocab="train", max_vocab=128)
    c.sampler = dict(steps=MAX_LENGTH - 1, method="greedy", beam_size=4, length_penalty=1.0)
    c.sampler.back_refine = dict(enabled=False, at=0.5, keep=0.5)
    c.sampler.mbr, c.sampler.mbr_metric = 1, "bleu"

    c.total_steps = arg.steps or 1500
    c.num_epochs = 0
    c.stop_at_step = 0  # > 0: stop there with a checkpoint (resumable), keeping the schedule of total_steps
    c.optim = dict(lr=1e-3, warmup=0.05, decay="linear", end_lr_factor=0.0, weight_decay=0.01,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, frozen=[r"^vocab_ids$"])
    c.mesh = [("data", -1), ("fsdp", 1), ("model", 1)]
    c.distributed = distributed_section()
    c.sharding_rules = [(r"(kernel|embedding)$", "fsdp"), (r".*", "replicate")]

    c.log_every = 50
    c.checkpoint = dict(every_steps=500, keep=3)
    # The model's own CLIP scores the captions (no prompt: it was trained on bare captions), and its retrieval
    # recall and zero-shot probe accuracies are measured (clip_model_metrics).
    c.eval = dict(every_steps=0, at_end=True, sampling_steps=(MAX_LENGTH - 1,), limit=0, clip="self",
                  clip_prompt="", clip_model_metrics=True)

    if arg.runlocal:
        c.total_steps = arg.steps or 4
        c.input.batch_size = 8
        c.input.eval_batch_size = 8
        c.input.shuffle_buffer = 64
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.eval.limit = 16
    return c
