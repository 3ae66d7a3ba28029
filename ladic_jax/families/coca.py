"""``coca``: a vision-language model pretrained by image-text contrast and captioning (CoCa-style), and its
autoregressive captioner.

Every seed system stands on a pretrained image encoder it does not train (BLIP's ViT for LaDiC, CLIP for
CLIP-DiffusionLM and Prefix-diffusion). Where none can be had (the embedded shapes data, offline), this
family pretrains one, as those were pretrained (DESIGN §10): an image tower and a text tower trained by a
contrastive loss between their pooled embeddings (CLIP's softmax or SigLIP's sigmoid), plus a caption
decoder that cross-attends to the image tokens, trained by next-token prediction (CapPa / BLIP's LM loss).
Either loss may be switched off by its weight.

- The two towers and their projections are exactly HF CLIP's (``ladic_jax.encoders.clip.CLIP``, under
  ``clip/`` in the parameters), so that ``ladic-convert clip`` exports them in the Hugging Face CLIP
  layout and every other config loads them as it loads real pretrained weights. The text tower is CLIP's
  causal transformer, pooled at the end-of-text token (the tokenizer's [SEP] for a BERT tokenizer).
- The decoder (``ladic_jax.models.text_decoder``) has the diffuser's blocks and presets, so the
  autoregressive baseline can match a diffusion denoiser in depth and width. It reads the image tokens
  after the ViT's final LayerNorm (``ViT(normalize_tokens=True)``); a diffusion family loading the
  exported tower reads the same tokens (``model.image.normalize_tokens``).
- Sampling runs through the shared sampler loop: its steps are the decoding positions (``sampler.steps``
  tokens at most after the start token), each one new position with a key/value cache; greedy, or beam
  search with ``sampler.beam_size`` beams and length penalty ``sampler.length_penalty`` (the final beam is
  the one of highest log-probability / length^penalty).

Config (``config.model``):
  clip.pretrained: None (from scratch) or a CLIP directory / hub id to start from; clip.text_tower: "clip"
    (CLIP's causal text transformer) or "bert" (a BERT pooled by its pooler, as HF's
    VisionTextDualEncoderModel, the layout it is then exported in), with clip.text_pretrained a BERT
    checkpoint to start it from (e.g. "minilm", the packaged MiniLM-L6) or None; clip.config: the sizes
    (``text``: CLIPTextConfig fields, ``eos_token_id`` the tokenizer's end token; ``vision``: ViTConfig
    fields, ``stem`` "patch" or "conv"; ``projection_dim``; ``logit_scale_init``);
  decoder: preset name + overrides (``models.diffuser.DiffuserConfig``);
  contrastive: "softmax" (CLIP) | "sigmoid" (SigLIP, with a learned bias); contrastive_weight;
  caption_weight; pooled_caption_weight (optional, default 0: the same decoder also learns to caption from
  the projected image embedding alone, one condition token through a Dense, so that the embedding the
  CLIP-conditioned families read holds the whole caption; not exported: only the towers are); vocab ("full" | "train") and max_vocab (``families.vocab``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax.encoders import loading
from ladic_jax.encoders.bert import BertConfig
from ladic_jax.encoders.clip import CLIP, CLIPConfig, CLIPTextConfig
from ladic_jax.encoders.vit import ViTConfig
from ladic_jax.families import base
from ladic_jax.families import vocab as vocab_lib
from ladic_jax.models.diffuser import DiffuserConfig
from ladic_jax.models.text_decoder import TextDecoder
from ladic_jax.sharding import path_str, to_host

CONTRASTIVE = ("softmax", "sigmoid")
METHODS = ("greedy", "beam")
# CLIP caps its learned logit scale at 100 (the temperature at 0.01).
_MAX_LOG_SCALE = math.log(100.0)
# SigLIP's initial temperature and bias (Zhai et al. 2023): t = 10, b = -10.
_SIGLIP_LOG_SCALE, _SIGLIP_BIAS = math.log(10.0), -10.0


# ---------------------------------------------------------------------------------------------- losses


def same_caption(tokens: jax.Array) -> jax.Array:
    """(B, B) bool: captions i and j are the same token sequence (so each is a right match of the other's
    image; on small synthetic data two images of one batch can share a caption)."""
    return jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)


def softmax_contrastive(image: jax.Array, text: jax.Array, log_scale: jax.Array, positives: jax.Array
                        ) -> jax.Array:
    """CLIP's symmetric cross-entropy over the batch's cosine similarities scaled by exp(log_scale).

    ``image``, ``text``: L2-normalised (B, D); ``positives`` (B, B) bool with a true diagonal. Where a row
    has several positives the target spreads evenly over them. Returns the mean of the image-to-text and
    text-to-image losses.
    """
    logits = jnp.exp(log_scale) * image @ text.T
    target = positives.astype(jnp.float32)
    i2t = -jnp.sum(target / jnp.sum(target, 1, keepdims=True) * jax.nn.log_softmax(logits, 1), 1)
    t2i = -jnp.sum(target / jnp.sum(target, 0, keepdims=True) * jax.nn.log_softmax(logits, 0), 0)
    return (jnp.mean(i2t) + jnp.mean(t2i)) / 2


def sigmoid_contrastive(image: jax.Array, text: jax.Array, log_scale: jax.Array, bias: jax.Array,
                        positives: jax.Array) -> jax.Array:
    """SigLIP's loss: -1/B Σ_ij log σ(z_ij (exp(log_scale) cos_ij + bias)), z = +1 on positives, -1 else."""
    logits = jnp.exp(log_scale) * image @ text.T + bias
    z = jnp.where(positives, 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / image.shape[0]


def caption_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the weighted positions, and the accuracy of the argmax there."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    w = weights.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(nll * w) / n, jnp.sum((jnp.argmax(logits, -1) == targets) * w) / n


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------- the model


class CocaModel(nn.Module):
    """``clip`` (HF CLIP's towers and projections), ``decoder`` (the captioner), the SigLIP ``logit_bias``
    and the closed vocabulary's ``vocab_ids`` when used."""
    clip_config: CLIPConfig
    decoder_config: DiffuserConfig
    vocab_size: int          # classes of the decoder: K (closed vocabulary) or the tokenizer's
    closed_vocab: bool
    sigmoid: bool
    pooled_caption: bool = False  # the decoder also captions from the projected image embedding alone
    dtype: Any = jnp.float32

    def setup(self):
        self.clip = CLIP(self.clip_config, dtype=self.dtype)
        self.decoder = TextDecoder(self.decoder_config, self.vocab_size, dtype=self.dtype)
        if self.pooled_caption:
            self.pooled_to_cond = nn.Dense(self.decoder_config.cond_dim, dtype=self.dtype)
        if self.sigmoid:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(_SIGLIP_BIAS), (), jnp.float32)
        if self.closed_vocab:
            self.vocab_ids = self.param("vocab_ids", nn.initializers.zeros, (self.vocab_size,), jnp.float32)

    def encode_image(self, pixels):
        """(image tokens after the final LayerNorm (B, N, W), projected pooled feature (B, P))."""
        tokens, pooled = self.clip.vision_model(pixels, normalize_tokens=True)
        return tokens, self.clip.visual_projection(pooled)

    def encode_text(self, ids, mask):
        return self.clip.get_text_features(ids, mask)

    def logit_scale_and_bias(self):
        scale = self.clip.logit_scale.astype(jnp.float32)
        if self.sigmoid:
            return scale, self.logit_bias
        return jnp.minimum(scale, _MAX_LOG_SCALE), jnp.zeros((), jnp.float32)

    def condition(self, image_tokens):
        return self.decoder.condition(image_tokens)

    def pooled_condition(self, image_feature):
        """The decoder's condition from the projected image embedding (B, P) alone, as one image token."""
        return self.decoder.condition(self.pooled_to_cond(image_feature)[:, None, :])

    def caption_logits(self, ids, cond, deterministic=True):
        return self.decoder(ids, cond, deterministic)

    def decode_step(self, ids, position, cache, cond):
        return self.decoder.step(ids, position, cache, cond)

    def init_cache(self, batch):
        return self.decoder.init_cache(batch)

    def vocab(self):
        return jax.lax.stop_gradient(self.vocab_ids).astype(jnp.int32)

    def __call__(self, tokens, token_mask, image):
        img, feat = self.encode_image(image)
        self.encode_text(tokens, token_mask)
        self.logit_scale_and_bias()
        if self.pooled_caption:
            self.pooled_condition(feat)
        return self.caption_logits(jnp.zeros_like(tokens), self.condition(img))


# ---------------------------------------------------------------------------------------------- the family


def clip_config(model_cfg) -> CLIPConfig:
    """The CLIP sizes of ``config.model.clip``: spelled out in ``config``, or else the pretrained
    checkpoint's config.json."""
    clip_cfg = model_cfg.clip
    if clip_cfg.get("pretrained") and not clip_cfg.get("config"):
        path = loading.resolve_directory(clip_cfg.pretrained) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: config.model.clip.pretrained needs its config.json")
        return CLIPConfig.from_hf(json.loads(path.read_text()))
    c = clip_cfg.config.to_dict()
    if clip_cfg.get("text_tower", "clip") == "bert":
        text = BertConfig(**c["text"]) if c.get("text") else BertConfig.from_hf(
            json.loads((loading.resolve_directory(clip_cfg.text_pretrained) / "config.json").read_text()))
    else:
        text = CLIPTextConfig(**c["text"])
    return CLIPConfig(text=text, vision=ViTConfig(**c["vision"]), projection_dim=int(c["projection_dim"]),
                      logit_scale_init=float(c.get("logit_scale_init", CLIPConfig.logit_scale_init)))


@base.register
class Coca(base.Family):
    name = "coca"

    def __init__(self, config):
        super().__init__(config)
        self.validate(config)
        m = config.model
        cc = clip_config(m)
        self.sigmoid = m.contrastive == "sigmoid"
        if self.sigmoid and not (m.clip.get("pretrained")):
            cc = dataclasses.replace(cc, logit_scale_init=_SIGLIP_LOG_SCALE)
        self.clip_config = cc
        self._check_sizes(config, cc)
        self.vocab_size = vocab_lib.size(config)
        classes = self.vocab_size or cc.text.vocab_size
        dec = m.decoder
        self.decoder_config = DiffuserConfig.preset(
            dec.preset, latent_dim=1, cond_dim=cc.vision.hidden_size, max_len=config.input.max_length,
            **dec.get("overrides", {}))
        self.module = CocaModel(cc, self.decoder_config, classes, bool(self.vocab_size), self.sigmoid,
                                pooled_caption=bool(m.get("pooled_caption_weight", 0.0)), dtype=jnp.dtype(config.get("dtype", "float32")))

    @staticmethod
    def validate(config) -> None:
        """Rejects bad model/sampler values, naming the field."""
        c = config_lib
        c.require_choice(config, "model.contrastive", CONTRASTIVE)
        w_con = c.require_nonnegative(config, "model.contrastive_weight")
        w_cap = c.require_nonnegative(config, "model.caption_weight")
        if "pooled_caption_weight" in config.model:
            c.require_nonnegative(config, "model.pooled_caption_weight")
        c.check(w_con + w_cap > 0, "config.model.contrastive_weight",
                "and config.model.caption_weight are both 0: nothing would be trained")
        vocab_lib.validate(config)
        c.check(bool(config.model.clip.get("pretrained")) or bool(config.model.clip.get("config")),
                "config.model.clip", "needs `pretrained` (a CLIP directory or hub id) or `config` (the sizes)")
        if "text_tower" in config.model.clip:
            c.require_choice(config, "model.clip.text_tower", ("clip", "bert"))
        if config.model.clip.get("text_tower", "clip") == "bert":
            c.check(bool(config.model.clip.get("text_pretrained")) or bool(config.model.clip.config.get("text")),
                    "config.model.clip.text_pretrained", "or config.model.clip.config.text (the BERT sizes) is "
                    "needed for a BERT text tower")
        L = config.input.max_length
        steps = c.get_field(config, "sampler.steps")
        c.check(c.is_int(steps) and 1 <= steps <= L - 1, "config.sampler.steps",
                f"must be an int in 1..{L - 1} (tokens decoded after the start token; input.max_length={L}), "
                f"got {steps!r}")
        c.require_choice(config, "sampler.method", METHODS)
        c.require_positive(config, "sampler.beam_size", integer=True)
        c.require_nonnegative(config, "sampler.length_penalty")
        br = config.sampler.get("back_refine")
        c.check(br is None or not br.get("enabled", False), "config.sampler.back_refine.enabled",
                "Back&Refine is a diffusion technique; an autoregressive decoder has no noise to restart from")
        for i, n in enumerate(config.eval.sampling_steps if "eval" in config else ()):
            c.check(n <= L - 1, f"config.eval.sampling_steps[{i}]", f"must be at most input.max_length - 1 = {L - 1}")

    @staticmethod
    def _check_sizes(config, cc: CLIPConfig) -> None:
        size = config.input.image_size
        config_lib.check(cc.vision.image_size == size, "config.model.clip.config.vision.image_size",
                         f"is {cc.vision.image_size}, but config.input.image_size is {size}")
        L = config.input.max_length
        config_lib.check(cc.text.max_position_embeddings >= L, "config.model.clip.config.text.max_position_embeddings",
                         f"is {cc.text.max_position_embeddings}, shorter than config.input.max_length={L}")

    # ---- text ------------------------------------------------------------------------------------

    def decode(self, token_ids: np.ndarray) -> list[str]:
        return self.decode_to_end(token_ids)

    # ---- parameters ------------------------------------------------------------------------------
    def _apply(self, params, *args, method, **kw):
        return self.module.apply({"params": params}, *args, method=method, **kw)

    def init(self, rng, batch):
        b = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
        return self.module.init(rng, b["tokens"], b["token_mask"], b["image"])["params"]

    def load_pretrained(self, abstract_params):
        clip_cfg = self.config.model.clip
        src = clip_cfg.get("pretrained")
        if not src:
            text_src = clip_cfg.get("text_pretrained") if clip_cfg.get("text_tower", "clip") == "bert" else None
            if not text_src:
                return {}, ["clip: randomly initialised"]
            # A BERT text tower (with its pooler) from a BERT checkpoint, e.g. the packaged MiniLM; the rest random.
            pre = loading.load_pretrained(text_src, "bert", pooler=True)
            if pre.config != self.clip_config.text:
                raise ValueError(f"config.model.clip.config.text disagrees with the config.json of {text_src}: "
                                 f"{self.clip_config.text} vs {pre.config}")
            flat = [(p, v) for p, v in jax.tree_util.tree_flatten_with_path(pre.params)[0]
                    if not path_str(p).startswith("mlm_head/")]
            return ({f"clip/text_model/{path_str(p)}": np.asarray(v) for p, v in flat},
                    [f"clip: text tower loaded from {text_src} ({len(flat)} tensors), the rest randomly initialised"])
        pre = loading.load_pretrained(src, "clip")
        if self.config.model.clip.get("config") and pre.config != self.clip_config:
            raise ValueError(f"config.model.clip.config disagrees with the config.json of {src}: "
                             f"{self.clip_config} vs {pre.config}")
        flat = jax.tree_util.tree_flatten_with_path(pre.params)[0]
        return ({f"clip/{path_str(p)}": np.asarray(v) for p, v in flat},
                [f"clip: loaded {len(flat)} tensors from {src}"])

    def prepare(self, params, train_batches: Iterator[dict[str, jax.Array]]):
        """The closed vocabulary's ids from one epoch of training captions (nothing else to prepare); also
        checks that the text tower pools at the tokenizer's end token."""
        start, end, pad = self.start_end_pad
        if not self.clip_config.bert_text:  # CLIP's tower pools at the end token; a BERT's at [CLS]
            eos = self.clip_config.text.eos_token_id
            config_lib.check(eos == end or eos == 2, "config.model.clip.config.text.eos_token_id",
                             f"is {eos}, but tokenizer {self.config.input.tokenizer!r} ends captions with id {end}")
        if not self.vocab_size:
            return {}, []
        seen: set[int] = set()
        for _, batch in zip(range(vocab_lib.epoch_batches(self.config)), train_batches):
            seen.update(np.unique(to_host(batch["tokens"])).tolist())
        ids, note = vocab_lib.build(seen, (pad, start, end), self.vocab_size)
        return {"vocab_ids": ids}, [note]

    def own_clip(self, params):
        """(module, params, config) of this model's CLIP (for CLIPScore, retrieval and the export)."""
        return CLIP(self.clip_config), params["clip"], self.clip_config

    # ---- closed vocabulary -------------------------------------------------------------------------
    def _to_classes(self, params, tokens):
        """Token ids -> decoder classes, and whether each id is one (always, with the full vocabulary)."""
        if not self.vocab_size:
            return tokens, jnp.ones(tokens.shape, bool)
        return vocab_lib.to_index(self._apply(params, method=CocaModel.vocab), tokens)

    def _to_token_ids(self, params, classes):
        if not self.vocab_size:
            return classes
        return vocab_lib.to_token_ids(self._apply(params, method=CocaModel.vocab), classes)

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, params, batch, rng, train=True):
        m = self.config.model
        tokens, token_mask = batch["tokens"], batch["token_mask"]
        img_tokens, img_feat = self._apply(params, batch["image"], method=CocaModel.encode_image)
        loss, metrics = 0.0, {}
        if m.contrastive_weight:
            txt_feat = self._apply(params, tokens, token_mask, method=CocaModel.encode_text)
            image, text = _normalize(img_feat), _normalize(txt_feat)
            log_scale, bias = self._apply(params, method=CocaModel.logit_scale_and_bias)
            positives = same_caption(tokens)
            if self.sigmoid:
                con = sigmoid_contrastive(image, text, log_scale, bias, positives)
            else:
                con = softmax_contrastive(image, text, log_scale, positives)
            sims = image @ text.T
            hit = jnp.take_along_axis(positives, jnp.argmax(sims, 1)[:, None], 1)[:, 0]
            loss = loss + m.contrastive_weight * con
            metrics.update(contrastive=con, i2t_batch_acc=jnp.mean(hit), logit_scale=jnp.exp(log_scale))
        w_pooled = m.get("pooled_caption_weight", 0.0)
        if m.caption_weight or w_pooled:
            classes, known = self._to_classes(params, tokens)
            weights = (token_mask[:, 1:] > 0) & known[:, 1:]
            k_tok, k_pooled = jax.random.split(rng)

            def captioning(cond, key):
                logits = self._apply(params, classes[:, :-1], cond, not train, method=CocaModel.caption_logits,
                                     rngs={"dropout": key})
                return caption_loss(logits, classes[:, 1:], weights)

            if self.vocab_size:
                metrics["out_of_vocab"] = 1.0 - jnp.sum(known * token_mask) / jnp.sum(token_mask)
        if m.caption_weight:
            ce, acc = captioning(self._apply(params, img_tokens, method=CocaModel.condition), k_tok)
            loss = loss + m.caption_weight * ce
            metrics.update(caption_ce=ce, token_acc=acc)
        if w_pooled:
            # Captioning from the pooled embedding alone makes it carry the whole scene: contrast alone
            # leaves out what a batch never needs to tell images apart (shapes, on the shapes data), and
            # the CLIP-conditioned families (clip_diffusionlm, prefix_diffusion) read only this embedding.
            ce, acc = captioning(self._apply(params, img_feat, method=CocaModel.pooled_condition), k_pooled)
            loss = loss + w_pooled * ce
            metrics.update(pooled_caption_ce=ce, pooled_token_acc=acc)
        return loss, metrics

    # ---- sampling: the shared loop's steps are decoding positions -------------------------------------
    def timesteps(self, sampler_cfg):
        return np.arange(int(sampler_cfg.steps), dtype=np.int32)

    def _beams(self, sampler_cfg) -> int:
        return int(sampler_cfg.beam_size) if sampler_cfg.method == "beam" else 1

    def sampling_context(self, params, batch, sampler_cfg):
        img_tokens, _ = self._apply(params, batch["image"], method=CocaModel.encode_image)
        k = self._beams(sampler_cfg)
        if k > 1:  # every beam of an image reads the same keys/values: repeat them per beam
            img_tokens = jnp.repeat(img_tokens, k, axis=0)
        return {"cond": self._apply(params, img_tokens, method=CocaModel.condition)}

    def _special_classes(self, params):
        start, end, pad = self.start_end_pad
        ids = jnp.asarray([start, end, pad], jnp.int32)
        classes = self._to_classes(params, ids)[0] if self.vocab_size else ids
        return classes[0], classes[1], classes[2]

    def initial_state(self, params, context, rng, sampler_cfg):
        rows = context["cond"][0][0].shape[0]
        k = self._beams(sampler_cfg)
        start, _, pad = self._special_classes(params)
        ids = jnp.full((rows, self.config.input.max_length), pad, jnp.int32).at[:, 0].set(start)
        state = {"ids": ids, "cache": self._apply(params, rows, method=CocaModel.init_cache),
                 "done": jnp.zeros((rows,), bool)}
        if k > 1:
            b = rows // k
            # Only the first beam of each image is live at the start, so that the k beams that come out of
            # the first step are k different tokens rather than one token k times.
            state["logp"] = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), b)
            state["length"] = jnp.zeros((rows,), jnp.int32)
        return state

    def denoise_step(self, params, context, state, t, t_next, rng, sampler_cfg):
        """Decodes position t + 1 from the token at position t (greedy, or one step of beam search)."""
        _, end, pad = self._special_classes(params)
        ids = state["ids"]
        current = jax.lax.dynamic_index_in_dim(ids, t, axis=1, keepdims=False)
        logits, cache = self._apply(params, current, t, state["cache"], context["cond"],
                                    method=CocaModel.decode_step)
        done = state["done"]
        if self._beams(sampler_cfg) == 1:
            nxt = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))
            ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], t + 1, axis=1)
            return {"ids": ids, "cache": cache, "done": done | (nxt == end)}
        k = self._beams(sampler_cfg)
        rows, classes = logits.shape
        b = rows // k
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        # A finished beam continues with padding at no cost, so its score stays what it was.
        finished = jnp.where(jnp.arange(classes) == pad, 0.0, -jnp.inf)
        logp = jnp.where(done[:, None], finished, logp)
        total = (state["logp"][:, None] + logp).reshape(b, k * classes)
        best, flat = jax.lax.top_k(total, k)                       # (b, k)
        parent = (flat // classes + jnp.arange(b)[:, None] * k).reshape(-1)  # rows of the parents
        nxt = (flat % classes).reshape(-1).astype(jnp.int32)
        ids = jax.lax.dynamic_update_slice_in_dim(ids[parent], nxt[:, None], t + 1, axis=1)
        length = state["length"][parent] + (~done[parent]).astype(jnp.int32)
        cache = jax.tree.map(lambda a: a[parent], cache)
        return {"ids": ids, "cache": cache, "done": done[parent] | (nxt == end), "logp": best.reshape(-1),
                "length": length}

    def finalize(self, params, context, state, sampler_cfg):
        ids = state["ids"]
        k = self._beams(sampler_cfg)
        if k > 1:
            b = ids.shape[0] // k
            penalty = float(sampler_cfg.length_penalty)
            score = state["logp"] / jnp.maximum(state["length"], 1).astype(jnp.float32) ** penalty
            best = jnp.argmax(score.reshape(b, k), -1) + jnp.arange(b) * k
            ids = ids[best]
        return self._to_token_ids(params, ids)
