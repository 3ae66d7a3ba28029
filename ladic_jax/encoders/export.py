"""Export a Flax `CLIP` as a Hugging Face CLIP checkpoint directory, strictly, so that it loads like real weights.

    path = export_clip(params, config, out_dir, tokenizer=tokenizer, image_mean=MEAN, image_std=STD)
    pre = load_pretrained(path, "clip")                      # or "clip_vision" for the vision tower alone
    model = transformers.CLIPModel.from_pretrained(path)     # PyTorch: the same embeddings (patch stem only)

With a BERT text tower (`config.text` a `BertConfig`) the directory is an HF `VisionTextDualEncoderModel` instead
(model_type "vision-text-dual-encoder", a BERT text config and a CLIP vision config; tensors `text_model.<BertModel
names, pooler included>`, `vision_model.<CLIP vision names>`, the two projections and `logit_scale`), loaded by
`transformers.VisionTextDualEncoderModel.from_pretrained(path)`.

The directory holds `config.json` (a transformers `CLIPConfig` dict), `model.safetensors` (HF tensor names, made by
running the loading tables of `checkpoint_names` backwards, so that export and loading cannot disagree), the
tokenizer files when a tokenizer is given, and `preprocessor_config.json` (a `CLIPImageProcessor`) when
`image_mean`/`image_std` are given.

`params` must be exactly the parameter tree of `CLIP(config)`: a missing, extra or mis-shaped leaf raises
`CheckpointMismatchError` naming it (drop anything else, e.g. a SigLIP `logit_bias`, before exporting). Only the
CLIP variant of the ViT (`pre_norm`, no `patch_bias`, final LayerNorm on the CLS token only) can be written, since an
HF CLIP config has no switch for the others.

Conv stem: a vision tower with `stem="conv"` has parameters HF CLIP lacks. They are written as
`vision_model.embeddings.stem.{i}.conv.{weight,bias}` and `vision_model.embeddings.stem.{i}.norm.{weight,bias}`
(`embeddings.patch_embedding` is then the 1x1 projection), and the vision config gets `"stem": "conv"`. Such a
directory loads exactly with `load_pretrained`, but transformers cannot load it (a warning is logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ladic_jax.encoders import checkpoint_names as names
from ladic_jax.encoders.checkpoint_files import SAFETENSORS, write_safetensors
from ladic_jax.encoders.clip import _LEGACY_EOS_TOKEN_ID, CLIP, DUAL_ENCODER_MODEL_TYPE, CLIPConfig
from ladic_jax.encoders.loading import clip_rules
from ladic_jax.encoders.vit import ViTConfig

log = logging.getLogger(__name__)

_BICUBIC = 3  # PIL.Image.BICUBIC, CLIP's resampling filter


def clip_hf_config(config: CLIPConfig, *, bos_token_id: int | None = None, pad_token_id: int | None = None,
                   dtype: str | None = None) -> dict[str, Any]:
    """The config.json dict of a transformers `CLIPModel` (or, for a BERT text tower, `VisionTextDualEncoderModel`)
    with the architecture of `config`.

    `CLIPConfig.from_hf` of it gives `config` back. For a CLIP text tower, bos/pad ids are written as given, None
    included (HF's defaults, 49406 and 1, may lie outside a small vocabulary); the forward pass reads neither: only
    `eos_token_id` chooses the pooled position. A BERT text config carries its own `pad_token_id` and takes neither.
    """
    _check_clip_variant(config.vision)
    t, v = config.text, config.vision
    if config.bert_text and (bos_token_id, pad_token_id) != (None, None):
        raise ValueError("bos/pad ids are written for a CLIP text tower only; a BertConfig carries its pad_token_id")
    sizes = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                 num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                 max_position_embeddings=t.max_position_embeddings)
    if config.bert_text:
        text = dict(model_type="bert", **sizes, type_vocab_size=t.type_vocab_size, hidden_act=t.hidden_act,
                    layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id, position_embedding_type="absolute")
    else:
        text = dict(model_type="clip_text_model", **sizes, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                    projection_dim=config.projection_dim, eos_token_id=t.eos_token_id)
        text.update(bos_token_id=bos_token_id, pad_token_id=pad_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, num_channels=v.num_channels,
                  image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                  layer_norm_eps=v.layer_norm_eps, projection_dim=config.projection_dim)
    if v.stem != "patch":
        vision["stem"] = v.stem  # read by `ViTConfig.from_hf`; unknown to transformers
    architecture, model_type = _hf_architecture(config)
    hf = dict(architectures=[architecture], model_type=model_type, projection_dim=config.projection_dim,
              logit_scale_init_value=config.logit_scale_init, text_config=text, vision_config=vision)
    if dtype is not None:
        hf["dtype"] = dtype
    return hf


def _hf_architecture(config: CLIPConfig) -> tuple[str, str]:
    """(transformers class, model_type) of the export of `config`."""
    return ("VisionTextDualEncoderModel", DUAL_ENCODER_MODEL_TYPE) if config.bert_text else ("CLIPModel", "clip")


def clip_preprocessor_config(vision: ViTConfig, image_mean: Sequence[float], image_std: Sequence[float]
                             ) -> dict[str, Any]:
    """A `CLIPImageProcessor` config: resize the short side (bicubic), centre-crop to `image_size`, normalise."""
    mean, std = [float(x) for x in image_mean], [float(x) for x in image_std]
    for name, values in (("image_mean", mean), ("image_std", std)):
        if len(values) != vision.num_channels:
            raise ValueError(f"{name} has {len(values)} values, the vision tower has {vision.num_channels} channels")
    if min(std) <= 0:
        raise ValueError(f"image_std must be positive, got {std}")
    size = vision.image_size
    return dict(image_processor_type="CLIPImageProcessor", do_convert_rgb=True, do_resize=True,
                size={"shortest_edge": size}, resample=_BICUBIC, do_center_crop=True,
                crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=mean, image_std=std)


def export_clip(params: Any, config: CLIPConfig, out_dir: str | Path, *, tokenizer: Any = None,
                image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> Path:
    """Writes `params` of `CLIP(config)` as an HF CLIP (or, with a BERT text tower, VisionTextDualEncoder)
    checkpoint directory (see the module docstring); returns it.

    Everything is checked before anything is written. With a tokenizer, its vocabulary must fit; for a CLIP text tower
    its end token (eos, else [SEP]) must be the config's `eos_token_id` (unless that is the legacy 2, which pools at the
    largest id), and its bos (else [CLS]) and pad ids go into the config.
    """
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    size = config.vision.image_size
    abstract = jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                              jnp.zeros((1, size, size, config.vision.num_channels)))["params"]
    template = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    tensors = names.export_checkpoint(flat, clip_rules(config), template,
                                      description=f"params exported as {_hf_architecture(config)[0]} "
                                                  f"({config.vision.stem} stem)")
    dtypes = {str(np.asarray(t).dtype) for t in tensors.values()}
    hf = clip_hf_config(config, **_token_ids(tokenizer, config), dtype=dtypes.pop() if len(dtypes) == 1 else None)
    if CLIPConfig.from_hf(hf) != config:
        raise AssertionError(f"internal: config.json does not read back as {config}: {hf}")
    if (image_mean is None) != (image_std is None):
        raise ValueError("give both image_mean and image_std, or neither")
    preprocessor = None if image_mean is None else clip_preprocessor_config(config.vision, image_mean, image_std)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_safetensors(out / SAFETENSORS, tensors, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if preprocessor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    if config.vision.stem != "patch":
        log.warning("exported %s with a %r vision stem: ladic_jax's load_pretrained reads it, transformers' "
                    "%s cannot (HF CLIP has no such stem)", out, config.vision.stem, _hf_architecture(config)[0])
    return out


def _check_clip_variant(vision: ViTConfig) -> None:
    clip = dict(pre_norm=True, patch_bias=False, norm_all_tokens=False)
    wrong = {k: getattr(vision, k) for k, want in clip.items() if getattr(vision, k) != want}
    if wrong:
        raise ValueError(f"only the CLIP variant of the ViT ({clip}) can be exported as HF CLIP; the vision config "
                         f"has {wrong}")


def _token_ids(tokenizer: Any, config: CLIPConfig) -> dict[str, int]:
    """bos/pad ids of the tokenizer (none for BERT text: it pools at [CLS], its config carries its pad id), after
    checking that its vocabulary fits and that it ends captions with the token a CLIP text tower pools at."""
    if tokenizer is None:
        return {}
    text = config.text
    if not config.bert_text:
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if text.eos_token_id != _LEGACY_EOS_TOKEN_ID and end is not None and end != text.eos_token_id:
            raise ValueError(f"the text tower pools at eos_token_id={text.eos_token_id}, but the tokenizer ends a "
                             f"text with id {end}")
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the text tower's vocab_size is {text.vocab_size}")
    if config.bert_text:
        return {}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    return dict(bos_token_id=bos, pad_token_id=tokenizer.pad_token_id)
