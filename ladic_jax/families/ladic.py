"""LaDiC (seed 001): continuous diffusion in the latent space of a BERT split in the middle.

Text space: the lower ``split_layer`` layers of a pretrained BERT (with its embeddings) map a caption
to per-token latents; these are normalised per channel with statistics gathered from training
captions. The upper layers plus the MLM head decode a latent back to tokens (``split_layer`` equal to
the number of layers leaves only the MLM head, as the authors' release does). Special tokens ([CLS],
[SEP], [PAD]) get a fixed latent so that caption length is learned: the zero latent (the paper) or
the encoder output of "." (the authors' release puts it in unnormalised: "period_raw"), with the CE
target at those positions set to [PAD] or "." respectively; decoding drops them.

Denoiser: the ``Diffuser`` (self-attention, cross-attention to the image tokens, MLP) predicting x0,
with self-conditioning and classifier-free guidance through a learned null image condition (or, as
the release, the tokens of an all-zero image).

Loss: ``L_latent + λ CE(mlm_head(upper(x̂0 · std + mean)), targets)``.

Config (``config.model``):
  text.pretrained: "minilm" (the packaged MiniLM-L6), a local HF directory or hub id, or None (random
    init from ``text.config``); text.config: the sizes, optional beside ``pretrained`` (then the
    checkpoint's config.json must agree, and the model can be built without the checkpoint at hand);
    text.split_layer; text.target_dropout (BERT's dropout rate while the frozen encoder computes the training
    targets x0: the release runs it so, in train mode, at BERT's 0.1; 0 = off, the paper and every other
    config); special_latent: "zero" | "period" | "period_raw";
  image: the ViT (``image.pretrained`` and ``image.config`` like text; ``config`` alone trains from scratch;
    ``image.normalize_tokens``: the cross-attention reads every token after the ViT's final LayerNorm, which
    a CLIP tower applies to the pooled token only: e.g. a tower exported by the ``coca`` family, whose
    decoder read them so);
  diffuser: preset name + overrides; latent_loss: "l2" (mean over tokens of the L2 norm, as the
  release) | "mse"; ce_weight (λ); self_cond_prob; uncond_prob; stats_batches;
  latent_std_eps (normalisation divides by std + eps; the release: 0); null_condition: "learned" (a
  learned null image condition) | "zero_image" (the release: the image tokens of an all-zero normalised
  image); postprocess: "plain" | "official" (the release's caption clean-up, see ``decode``);
  input_scaling (feed the model x_t / sqrt(ᾱ_t + k²(1 - ᾱ_t)), unit variance at every t, k the training or
  sampling noise factor; off in the paper and the release); image_words_weight (weight of an auxiliary
  loss training the image encoder to tell which words an image's captions use; 0 = off; for image
  encoders trained from scratch).
``config.diffusion``: schedule, num_timesteps, noise_factor, sample_noise_factor.
``config.sampler``: steps, method ("ddim" | "renoise"), eta, guidance (w), self_cond, t_offset; and the
shared loop's back_refine, mbr, mbr_metric (``ladic_jax.sampler``).

Infilling (paper §4.5): a sampling batch with ``template_tokens``/``template_given`` keeps the given
tokens: their latents (encoded with the blanks masked out) replace x̂0 at their positions after every
prediction, clean, and the update then noises them to the next timestep like the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ladic_jax import config as config_lib
from ladic_jax.diffusion.gaussian import SCHEDULES, GaussianDiffusion
from ladic_jax.encoders import bert as bert_lib
from ladic_jax.encoders import vit as vit_lib
from ladic_jax.encoders import loading
from ladic_jax.families import base
from ladic_jax.families import guidance
from ladic_jax.families import vocab as vocab_lib
from ladic_jax.models.diffuser import Diffuser, DiffuserConfig
from ladic_jax.sharding import path_str, to_host

_STD_EPS = 1e-5


class LadicModel(nn.Module):
    """All LaDiC parameters: ``text`` (split BERT), ``image`` (ViT), ``diffuser``, latent statistics."""
    text_config: bert_lib.BertConfig
    image_config: vit_lib.ViTConfig
    diffuser_config: DiffuserConfig
    split_layer: int
    vocab_size: int = 0     # > 0: the MLM head scores only this many token ids (``vocab_ids``)
    std_eps: float = _STD_EPS
    image_words: bool = False  # a linear head from the pooled image tokens to caption-word scores
    normalize_image_tokens: bool = False  # the ViT's final LayerNorm on every image token (CLIP: CLS only)
    text_dropout: float = 0.0  # BERT dropout when the training targets are encoded (``model.text.target_dropout``)
    dtype: Any = jnp.float32

    def setup(self):
        self.text = bert_lib.Bert(self.text_config, dtype=self.dtype, dropout_rate=self.text_dropout)
        self.image = vit_lib.ViT(self.image_config, dtype=self.dtype)
        self.diffuser = Diffuser(self.diffuser_config, dtype=self.dtype)
        d = self.text_config.hidden_size
        self.latent_mean = self.param("latent_mean", nn.initializers.zeros, (d,), jnp.float32)
        self.latent_std = self.param("latent_std", nn.initializers.ones, (d,), jnp.float32)
        if self.vocab_size:
            # Token ids of a closed vocabulary (set by Ladic.prepare), stored as exact float32 values so
            # that they live in the checkpoint with the other parameters; never trained.
            self.vocab_ids = self.param("vocab_ids", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
        if self.image_words:
            self.image_words_head = nn.Dense(self.vocab_size or self.text_config.vocab_size, dtype=jnp.float32)

    # text space
    def encode_raw(self, tokens, token_mask, deterministic=True):
        h = self.text.embed(tokens, deterministic=deterministic)
        return self.text.encode(h, token_mask, 0, self.split_layer, deterministic=deterministic)

    def normalize(self, h):
        mean, std = jax.lax.stop_gradient((self.latent_mean, self.latent_std))
        return (h.astype(jnp.float32) - mean) / (std + self.std_eps)

    def decode_logits(self, x):
        mean, std = jax.lax.stop_gradient((self.latent_mean, self.latent_std))
        h = x.astype(jnp.float32) * (std + self.std_eps) + mean
        ones = jnp.ones(x.shape[:2], jnp.int32)
        h = self.text.encode(h.astype(self.dtype), ones, self.split_layer, None)
        return self.text.mlm_logits(h, self.vocab() if self.vocab_size else None)

    def vocab(self):
        """The closed vocabulary's token ids (K,) int32."""
        return jax.lax.stop_gradient(self.vocab_ids).astype(jnp.int32)

    # image and denoiser
    def image_tokens(self, image):
        tokens, _ = self.image(image, normalize_tokens=self.normalize_image_tokens)
        return tokens

    def image_word_logits(self, image_tokens):
        """Scores (B, K) of which words the captions of each image use, from its image tokens max-pooled
        (presence anywhere in the picture; on the shapes set it taught the encoder shapes faster than the
        mean token: shape-word precision/recall 0.75/0.67 vs 0.69/0.65 after 700 steps)."""
        return self.image_words_head(jnp.max(image_tokens.astype(jnp.float32), 1))

    def condition(self, image_tokens, null_mask):
        return self.diffuser.condition(image_tokens, null_mask)

    def denoise(self, x_t, t, self_cond, cond, deterministic=True):
        return self.diffuser.denoise(x_t, t, self_cond, cond, deterministic=deterministic)

    def __call__(self, tokens, token_mask, image):
        x0 = self.normalize(self.encode_raw(tokens, token_mask))
        img = self.image_tokens(image)
        null = jnp.zeros((tokens.shape[0],), bool)
        x0_hat = self.diffuser(x0, jnp.zeros((tokens.shape[0],), jnp.int32), jnp.zeros_like(x0), img, null)
        if self.image_words:  # creates the head's parameters at init
            self.image_word_logits(img)
        return self.decode_logits(x0_hat)


def _hf_config(name: str, subtree: str | None = None) -> dict:
    path = loading.resolve_directory(name) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a pretrained model directory needs its config.json")
    cfg = json.loads(path.read_text())
    return cfg.get(subtree, cfg) if subtree else cfg


# A part's architecture: its ``config`` sizes when given (then a pretrained checkpoint must agree with
# them, checked in ``load_pretrained``), else the pretrained checkpoint's config.json. Spelled-out sizes
# let a config be built without its checkpoints at hand (ahead-of-time compilation, resuming elsewhere).
def _text_config(text_cfg) -> bert_lib.BertConfig:
    if text_cfg.get("pretrained") and not text_cfg.get("config"):
        return bert_lib.BertConfig.from_hf(_hf_config(text_cfg.pretrained))
    return bert_lib.BertConfig(**text_cfg.config.to_dict())


def _image_config(image_cfg) -> vit_lib.ViTConfig:
    if image_cfg.get("pretrained") and not image_cfg.get("config"):
        return vit_lib.ViTConfig.from_hf(_hf_config(image_cfg.pretrained, "vision_config"))
    return vit_lib.ViTConfig(**image_cfg.config.to_dict())


def _check_architecture(part: str, declared, loaded, source: str) -> None:
    """Raises if the sizes in config.model.<part>.config differ from those of the checkpoint's config.json."""
    if declared == loaded:
        return
    diff = [f"{f.name}: {getattr(declared, f.name)!r} in the config, {getattr(loaded, f.name)!r} in the checkpoint"
            for f in dataclasses.fields(declared) if getattr(declared, f.name) != getattr(loaded, f.name)]
    raise ValueError(f"config.model.{part}.config disagrees with the config.json of {source}: {'; '.join(diff)}")


@base.register
class Ladic(base.Family):
    name = "ladic"
    feature_field, feature_params = "image_tokens", r"^image/"

    def __init__(self, config):
        super().__init__(config)
        self.validate(config)
        m = config.model
        self.text_config = _text_config(m.text)
        self.image_config = _image_config(m.image)
        self.split_layer = int(m.text.split_layer)
        if not 0 < self.split_layer <= self.text_config.num_layers:
            raise ValueError(f"config.model.text.split_layer must be in 1..{self.text_config.num_layers}, "
                             f"got {self.split_layer}")
        sizes = dict(max_len=config.input.max_length, num_timesteps=config.diffusion.num_timesteps)
        sizes.update(m.diffuser.get("overrides", {}))  # e.g. the release's max_len 512
        self.diffuser_config = DiffuserConfig.preset(
            m.diffuser.preset, latent_dim=self.text_config.hidden_size,
            cond_dim=self.image_config.hidden_size, **sizes)
        dtype = jnp.dtype(config.get("dtype", "float32"))
        self.vocab_size = vocab_lib.size(config)
        self.module = LadicModel(self.text_config, self.image_config, self.diffuser_config,
                                 self.split_layer, self.vocab_size, float(m.get("latent_std_eps", _STD_EPS)),
                                 image_words=bool(m.get("image_words_weight", 0.0)),
                                 normalize_image_tokens=bool(m.image.get("normalize_tokens", False)),
                                 text_dropout=float(m.text.get("target_dropout", 0.0)), dtype=dtype)
        d = config.diffusion
        self.diffusion = GaussianDiffusion.create(d.schedule, d.num_timesteps, d.noise_factor,
                                                  d.sample_noise_factor)

    @staticmethod
    def validate(config) -> None:
        """Rejects bad model/diffusion/sampler values, naming the field."""
        c = config_lib
        c.require_choice(config, "model.special_latent", ("zero", "period", "period_raw"))
        rate = config.model.text.get("target_dropout", 0.0)
        c.check(isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1,
                "config.model.text.target_dropout", f"must be a rate in [0, 1) (0 = off), got {rate!r}")
        for name, choices in (("null_condition", ("learned", "zero_image")), ("postprocess", ("plain", "official"))):
            if name in config.model:
                c.require_choice(config, f"model.{name}", choices)
        if "latent_std_eps" in config.model:
            c.require_nonnegative(config, "model.latent_std_eps")
        c.require_choice(config, "model.latent_loss", ("l2", "mse"))
        vocab_lib.validate(config)
        c.require_nonnegative(config, "model.ce_weight")
        if "image_words_weight" in config.model:
            c.require_nonnegative(config, "model.image_words_weight")
        for name in ("self_cond_prob", "uncond_prob"):
            v = c.get_field(config, f"model.{name}")
            c.check(isinstance(v, (int, float)) and 0 <= v <= 1, f"config.model.{name}", f"must be in [0, 1], got {v!r}")
        c.require_positive(config, "model.stats_batches", integer=True)
        c.require_choice(config, "diffusion.schedule", SCHEDULES)
        T = c.require_positive(config, "diffusion.num_timesteps", integer=True)
        c.require_positive(config, "diffusion.noise_factor")
        c.require_positive(config, "diffusion.sample_noise_factor")
        steps = c.get_field(config, "sampler.steps")
        c.check(isinstance(steps, int) and 1 <= steps <= T, "config.sampler.steps", f"must be an int in 1..{T}, got {steps!r}")
        c.require_choice(config, "sampler.method", ("ddim", "renoise"))
        c.require_nonnegative(config, "sampler.eta")
        c.require_nonnegative(config, "sampler.guidance")
        c.require_nonnegative(config, "sampler.t_offset", integer=True)
        for i, n in enumerate(config.eval.sampling_steps if "eval" in config else ()):
            c.check(n <= T, f"config.eval.sampling_steps[{i}]", f"must be at most num_timesteps={T}, got {n}")

    # ---- text space -----------------------------------------------------------------------

    @functools.cached_property
    def _special_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        return tuple(sorted({tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}))

    @functools.cached_property
    def _period_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(".")

    def decode(self, token_ids: np.ndarray) -> list[str]:
        """Token ids (B, L) -> captions. ``postprocess="official"`` cleans up as the authors' release does,
        per caption: consecutive repeated tokens and then words dropped, "." stripped at both ends, one "."
        appended. Otherwise special tokens (and "." with a period special latent) are dropped."""
        if self.config.model.get("postprocess", "plain") == "official":
            return [self._official_caption(row) for row in np.asarray(token_ids)]
        drop = set(self._special_ids)
        if self.config.model.special_latent.startswith("period"):
            drop.add(self._period_id)
        out = []
        for row in np.asarray(token_ids):
            ids = [int(i) for i in row if int(i) not in drop]
            if self.config.model.get("dedup_consecutive", False):
                ids = [i for j, i in enumerate(ids) if j == 0 or ids[j - 1] != i]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=True).strip())
        return out

    def _official_caption(self, row: np.ndarray) -> str:
        # The release runs unique_consecutive over the whole batch at once (DESIGN §4); here per caption.
        ids = [int(i) for j, i in enumerate(row) if j == 0 or row[j - 1] != i]
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        split = text.split()
        words = [w for j, w in enumerate(split) if j == 0 or split[j - 1] != w]
        return " ".join(words).strip(".").strip() + "."

    def _apply(self, params, *args, method, **kw):
        return self.module.apply({"params": params}, *args, method=method, **kw)

    def _is_special(self, tokens):
        return jnp.isin(tokens, jnp.asarray(self._special_ids))

    def text_latents(self, params, tokens, token_mask, dropout_rng=None):
        """Normalised x0 latents (B,L,D) with the fixed special latent, and the CE targets (B,L). With
        ``dropout_rng`` and ``model.text.target_dropout`` > 0, the encoder runs with BERT's dropout (the release's
        training targets); the special latent is always computed without."""
        if dropout_rng is not None and self.module.text_dropout:
            raw = self._apply(params, tokens, token_mask, False, method=LadicModel.encode_raw,
                              rngs={"dropout": dropout_rng})
        else:
            raw = self._apply(params, tokens, token_mask, method=LadicModel.encode_raw)
        x0 = self._apply(params, raw, method=LadicModel.normalize)
        special = self._is_special(tokens)[..., None]
        if self.config.model.special_latent == "zero":
            fixed = jnp.zeros_like(x0[:, :1])
            target_special = self.tokenizer.pad_token_id
        else:  # the encoder output of "." at position 1 of "[CLS] . [SEP]" (the release: unnormalised)
            tok = self.tokenizer
            ids = jnp.asarray([[tok.cls_token_id, self._period_id, tok.sep_token_id]], jnp.int32)
            fixed = self._apply(params, ids, jnp.ones_like(ids), method=LadicModel.encode_raw)[:, 1:2]
            if self.config.model.special_latent == "period":
                fixed = self._apply(params, fixed, method=LadicModel.normalize)
            fixed = fixed.astype(x0.dtype)
            target_special = self._period_id
        x0 = jnp.where(special, fixed, x0)
        targets = jnp.where(special[..., 0], target_special, tokens)
        return jax.lax.stop_gradient(x0), targets

    # ---- parameters --------------------------------------------------------------------------
    def init(self, rng, batch):
        b = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
        return self.module.init(rng, b["tokens"], b["token_mask"], b["image"])["params"]

    def load_pretrained(self, abstract_params):
        out, notes = {}, []
        for part, cfg in (("text", self.config.model.text), ("image", self.config.model.image)):
            if not cfg.get("pretrained"):
                notes.append(f"{part}: randomly initialised")
                continue
            kind = "bert" if part == "text" else cfg.kind
            pre = loading.load_pretrained(cfg.pretrained, kind,
                                          subtree=cfg.get("subtree") or None)
            if cfg.get("config"):
                _check_architecture(part, self.text_config if part == "text" else self.image_config,
                                    pre.config, cfg.pretrained)
            flat = jax.tree_util.tree_flatten_with_path(pre.params)[0]
            out.update({f"{part}/{path_str(p)}": np.asarray(v) for p, v in flat})
            notes.append(f"{part}: loaded {len(flat)} tensors from {cfg.pretrained}"
                         + (f" (initialised, not in the checkpoint: {', '.join(pre.notes.initialised)})"
                            if pre.notes.initialised else ""))
        return out, notes

    def prepare(self, params, train_batches: Iterator[dict[str, jax.Array]]):
        """Per-channel mean/std of the encoder latents over ordinary (non-special) caption tokens."""
        special_ids = jnp.asarray(self._special_ids)

        @jax.jit
        def moments(params, tokens, token_mask):
            h = self._apply(params, tokens, token_mask, method=LadicModel.encode_raw).astype(jnp.float32)
            w = ((token_mask > 0) & ~jnp.isin(tokens, special_ids)).astype(jnp.float32)[..., None]
            return jnp.sum(w * h, (0, 1)), jnp.sum(w * h * h, (0, 1)), jnp.sum(w)

        s1 = s2 = n = 0.0
        nb = int(self.config.model.stats_batches)
        seen: set[int] = set()
        # With a closed vocabulary, scan one epoch of captions for their token ids.
        vocab_batches = vocab_lib.epoch_batches(self.config) if self.vocab_size else 0
        for i, batch in zip(range(max(nb, vocab_batches)), train_batches):
            if i < nb:
                a, b, c = moments(params, batch["tokens"], batch["token_mask"])
                s1, s2, n = s1 + np.asarray(a, np.float64), s2 + np.asarray(b, np.float64), n + float(c)
            if self.vocab_size:
                seen.update(np.unique(to_host(batch["tokens"])).tolist())  # all processes' rows
        if n == 0:
            raise ValueError("latent statistics: no caption tokens seen in the training data")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        out = {"latent_mean": mean.astype(np.float32), "latent_std": std.astype(np.float32)}
        notes = [f"latent statistics from {int(n)} tokens in {nb} batches: mean |mu| "
                 f"{np.abs(mean).mean():.3f}, mean sigma {std.mean():.3f}"]
        if self.vocab_size:
            tok = self.tokenizer
            always = (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, self._period_id)
            out["vocab_ids"], note = vocab_lib.build(seen, always, self.vocab_size)
            notes.append(note)
        return out, notes

    # ---- training ----------------------------------------------------------------------------
    def frozen_features(self, params, images):
        return self._apply(params, images, method=LadicModel.image_tokens)

    @property
    def _image_shape(self) -> tuple[int, int, int]:
        n = int(self.config.input.image_size)
        return (n, n, 3)

    def loss(self, params, batch, rng, train=True):
        m = self.config.model
        tokens, token_mask = batch["tokens"], batch["token_mask"]
        bsz = tokens.shape[0]
        x0, targets = self.text_latents(params, tokens, token_mask, jax.random.fold_in(rng, 7) if train else None)
        k_t, k_noise, k_null, k_sc, k_drop1, k_drop2 = jax.random.split(rng, 6)
        t = jax.random.randint(k_t, (bsz,), 0, self.diffusion.num_timesteps)
        x_t = self.diffusion.q_sample(x0, t, jax.random.normal(k_noise, x0.shape, x0.dtype))
        if m.get("input_scaling", False):
            x_t = x_t * self.diffusion.input_scale(t)[:, None, None]
        null = jax.random.bernoulli(k_null, m.uncond_prob, (bsz,)) if train else jnp.zeros((bsz,), bool)
        if "image_tokens" in batch:  # cached by the trainer (ladic_jax.feature_cache): a frozen encoder
            img = jax.lax.stop_gradient(batch["image_tokens"])
            if self._zero_image_null:
                zero = self.frozen_features(params, jnp.zeros((1,) + self._image_shape, jnp.float32))
                img, null = jnp.where(null[:, None, None], zero, img), jnp.zeros_like(null)
        else:
            image = batch["image"]
            if self._zero_image_null:
                image, null = jnp.where(null[:, None, None, None], 0.0, image), jnp.zeros_like(null)
            img = self._apply(params, image, method=LadicModel.image_tokens)
        cond = self._apply(params, img, null, method=LadicModel.condition)
        denoise = functools.partial(self._apply, params, method=LadicModel.denoise, deterministic=not train)
        zeros = jnp.zeros_like(x0)
        if m.self_cond_prob > 0:
            use_sc = jax.random.bernoulli(k_sc, m.self_cond_prob)
            sc = jax.lax.cond(
                use_sc,
                lambda: jax.lax.stop_gradient(denoise(x_t, t, zeros, cond, rngs={"dropout": k_drop1})),
                lambda: zeros)
        else:
            sc = zeros
        x0_hat = denoise(x_t, t, sc, cond, rngs={"dropout": k_drop2}).astype(jnp.float32)
        diff = x0_hat - x0
        if m.latent_loss == "l2":
            latent = jnp.mean(jnp.sqrt(jnp.sum(diff * diff, -1) + 1e-12))
        else:
            latent = jnp.mean(diff * diff)
        logits = self._apply(params, x0_hat, method=LadicModel.decode_logits).astype(jnp.float32)
        index, known = self._to_vocab_index(params, targets)
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.mean(jnp.take_along_axis(logp, index[..., None], -1))
        acc = jnp.mean((jnp.argmax(logits, -1) == index) & known)
        loss = latent + m.ce_weight * ce
        metrics = {"latent_loss": latent, "ce": ce, "token_acc": acc}
        if m.get("image_words_weight", 0.0):
            words = self._image_words_loss(params, img, tokens, index, known)
            loss = loss + m.image_words_weight * words
            metrics["image_words"] = words
        if self.vocab_size:
            metrics["out_of_vocab"] = 1.0 - jnp.mean(known)
        return loss, metrics

    def _image_words_loss(self, params, img, tokens, index, known):
        """Binary cross-entropy of the image-words head against the set of words in each caption.

        A direct training signal for an image encoder trained from scratch: without it the diffuser's
        cross-attention reads nothing useful from a random encoder and so passes back almost no gradient
        to it, and the diffuser learns a text-only denoiser first (see README, "Status and figures").
        """
        logits = self._apply(params, img, method=LadicModel.image_word_logits)
        word = known & ~self._is_special(tokens)
        present = jnp.max(jax.nn.one_hot(index, logits.shape[-1]) * word[..., None], axis=1)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, present), -1))

    # ---- sampling -----------------------------------------------------------------------------
    def timesteps(self, sampler_cfg):
        return self.diffusion.sampling_timesteps(int(sampler_cfg.steps))

    @property
    def _zero_image_null(self) -> bool:
        return self.config.model.get("null_condition", "learned") == "zero_image"

    def sampling_context(self, params, batch, sampler_cfg):
        img = self._apply(params, batch["image"], method=LadicModel.image_tokens)
        bsz = img.shape[0]
        ctx = {"cond": self._apply(params, img, jnp.zeros((bsz,), bool), method=LadicModel.condition)}
        if sampler_cfg.guidance:
            # The null condition is the same for every image: computed for one, broadcast.
            if self._zero_image_null:  # the release: the image tokens of an all-zero (normalised) image
                null = self._apply(params, self._apply(params, jnp.zeros_like(batch["image"][:1]),
                                                       method=LadicModel.image_tokens),
                                   jnp.zeros((1,), bool), method=LadicModel.condition)
            else:  # the learned null vector in place of every image token
                null = self._apply(params, img[:1], jnp.ones((1,), bool), method=LadicModel.condition)
            ctx.update(guidance.context(ctx["cond"], guidance.broadcast_rows(null, bsz), sampler_cfg))
        if "template_tokens" in batch:
            # Infilling: the latents of the given tokens, encoded with the blanks left out of attention.
            tokens, given = batch["template_tokens"], batch["template_given"] > 0
            attend = given & (tokens != self.tokenizer.pad_token_id)
            ctx["given"] = given
            ctx["given_tokens"] = tokens
            ctx["given_latent"], _ = self.text_latents(params, tokens, attend.astype(jnp.int32))
        return ctx

    def initial_state(self, params, context, rng, sampler_cfg):
        cond_leaf = jax.tree.leaves(context["cond"])[0]
        shape = (cond_leaf.shape[0], self.config.input.max_length, self.text_config.hidden_size)
        x = jax.random.normal(rng, shape, jnp.float32) * self.diffusion.sample_noise_factor
        return {"x": x, "x0_hat": jnp.zeros_like(x)}

    def predict_x0(self, params, context, x, t, self_cond, sampler_cfg):
        """x̂0 with classifier-free guidance: (1+w) f(x, v) - w f(x, ∅)."""
        t_model = jnp.minimum(t + int(sampler_cfg.get("t_offset", 0)), self.diffusion.num_timesteps - 1)
        tb = jnp.full((x.shape[0],), t_model, jnp.int32)
        if self.config.model.get("input_scaling", False):
            x = x * self.diffusion.input_scale(t, self.diffusion.sample_noise_factor)
        def f(x, tb, self_cond, cond):
            return self._apply(params, x, tb, self_cond, cond, method=LadicModel.denoise).astype(jnp.float32)

        w = float(sampler_cfg.guidance)
        if w:
            return guidance.combine(f, (x, tb, self_cond), context, w)
        return f(x, tb, self_cond, context["cond"])

    def denoise_step(self, params, context, state, t, t_next, rng, sampler_cfg):
        sc = state["x0_hat"] if sampler_cfg.self_cond else jnp.zeros_like(state["x"])
        x0_hat = self.predict_x0(params, context, state["x"], t, sc, sampler_cfg)
        if "given" in context:
            # Infilling: the given latents replace their prediction before the update, so that the
            # step noises them to t_next like any other x0 (DDIM and re-noising alike), and they are
            # what self-conditioning and the final decoding see.
            x0_hat = jnp.where(context["given"][..., None], context["given_latent"], x0_hat)
        bsz = x0_hat.shape[0]
        tb, tnb = jnp.full((bsz,), t, jnp.int32), jnp.full((bsz,), t_next, jnp.int32)
        if sampler_cfg.method == "ddim":
            x = self.diffusion.ddim_step(state["x"], x0_hat, tb, tnb, sampler_cfg.eta, rng)
        elif sampler_cfg.method == "renoise":
            x = self.diffusion.renoise_step(x0_hat, tnb, rng)
        else:
            raise ValueError(f"config.sampler.method must be ddim or renoise, got {sampler_cfg.method!r}")
        return {"x": x, "x0_hat": x0_hat}

    def finalize(self, params, context, state, sampler_cfg):
        return self.prediction(params, context, state, sampler_cfg)[0]

    def prediction(self, params, context, state, sampler_cfg):
        """Tokens decoded from x̂0 (the template's own tokens at its given positions: the upper BERT is
        contextual, so a given latent alone does not guarantee its token) and x̂0 itself."""
        logits = self._apply(params, state["x0_hat"], method=LadicModel.decode_logits)
        tokens = self._to_token_ids(params, jnp.argmax(logits, -1).astype(jnp.int32))
        if "given" in context:
            tokens = jnp.where(context["given"], context["given_tokens"], tokens)
        return tokens, state["x0_hat"]

    def back_and_refine(self, params, context, state, fresh, sampler_cfg):
        """Keeps the ``back_refine.keep`` fraction of positions whose x̂0 the LM head is most confident
        of (max softmax probability; ties to the earlier position) and given template positions; the
        others restart from ``fresh`` (noise, no self-conditioning).

        A kept position enters the restart as its x̂0 noised to the first timestep with the fresh noise
        (x_T ~ q(x_T | x̂0), the distribution the model was trained on) and as the self-conditioning x̂0.
        Putting the clean x̂0 into x_T instead (one reading of the paper's figure 5) scored worse on the
        shapes model (BLEU-4 0.070 vs 0.089, CIDEr 0.57 vs 0.97; plain sampling 0.080 / 0.64). With
        ᾱ_T ≈ 0 the kept tokens reach the refine pass through self-conditioning."""
        x0_hat = state["x0_hat"]
        logits = self._apply(params, x0_hat, method=LadicModel.decode_logits).astype(jnp.float32)
        confidence = jnp.max(jax.nn.softmax(logits, -1), -1)
        n_keep = int(np.floor(float(sampler_cfg.back_refine.keep) * confidence.shape[1] + 0.5))
        rank = jnp.argsort(jnp.argsort(-confidence, axis=-1, stable=True), axis=-1)
        kept = rank < n_keep
        if "given" in context:
            kept = kept | context["given"]
        kept = kept[..., None]
        k = self.diffusion.sample_noise_factor
        t = jnp.full((x0_hat.shape[0],), int(self.timesteps(sampler_cfg)[0]), jnp.int32)
        noised = self.diffusion.q_sample(x0_hat, t, fresh["x"] / k, factor=k)
        return {"x": jnp.where(kept, noised, fresh["x"]), "x0_hat": jnp.where(kept, x0_hat, fresh["x0_hat"])}

    def _to_token_ids(self, params, index):
        """Argmax positions of the logits -> token ids (identity with the full vocabulary)."""
        if not self.vocab_size:
            return index
        return vocab_lib.to_token_ids(self._apply(params, method=LadicModel.vocab), index)

    def _to_vocab_index(self, params, targets):
        """Token ids -> positions in the closed vocabulary (first match), and whether each was found."""
        if not self.vocab_size:
            return targets, jnp.ones(targets.shape, bool)
        return vocab_lib.to_index(self._apply(params, method=LadicModel.vocab), targets)
