"""What CLIP-DiffusionLM (seed 000) and Prefix-diffusion (seed 003) share: continuous diffusion on word
embeddings, conditioned on a CLIP image feature, by a BERT-shaped denoiser trained from scratch.

Text space: a word-embedding table E (the tokenizer's vocabulary x ``emb_dim``) and a head tied to it,
logits = x · Eᵀ / s + b; a caption of L token ids is the L x ``emb_dim`` sequence E[w] / s (padding
included: the model generates the [PAD] embedding where the caption has ended, which is how it learns
length). ``s`` (``emb_scale``, never trained) is 1 for learned embeddings and, for frozen pretrained ones
(``text.scale_embeddings``), their root mean square over the captions' tokens, so that x0 has unit scale
per channel like the noise (a pretrained table's entries are ~0.05: unscaled, nearly every timestep
would be pure noise). Clamping maps a vector to its nearest embedding, argmin_v ||x - E_v / s||²; the
output tokens are the head's argmax on the final x̂0, as both papers decode. With a closed vocabulary
(``families.vocab``) head and clamping see only the ids the captions use.

Condition: the CLIP image feature (HF ``get_image_features``: the pooled, projected embedding, L2
normalised when ``condition.normalize``) -> MLP (Linear-ReLU-Dropout-Linear) -> k tokens of the
denoiser's width, fused by

- ``concat``: appended after the L text tokens with their own position embeddings and the segment
  (token-type) embedding 1 (the text has 0); the denoiser attends over [text ; condition] and its
  output is read at the text positions;
- ``add``: the k tokens summed and added to every text position (no extra tokens).

The CLIP is loaded whole (its text tower too: classifier-free guidance with the CLIP text feature and
re-ranking candidates by image-text cosine need it) under ``clip/`` and frozen.

Denoiser (``WordDenoiser``): x_t -> (up-projection to the width when ``emb_dim`` differs) + position
(+ timestep) embeddings -> [; condition] -> LayerNorm -> BERT post-LN layers -> text positions ->
(down-projection) -> x̂0 (an x0-prediction, as both papers).

Sampling (the shared loop drives ``denoise_step``): ``ddim`` (any number of steps, η) or ``refeed``
(CLIP-DiffusionLM's inference: the prediction x̂0 is fed back as the next input, ``steps`` times),
with optional ``clamp`` (Prefix-diffusion: x̂0 replaced by its nearest embeddings at every step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax.data import text as text_lib
from ladic_jax.diffusion.gaussian import SCHEDULES, GaussianDiffusion
from ladic_jax.encoders import loading
from ladic_jax.encoders.attention import KERNEL_INIT
from ladic_jax.encoders.bert import BertConfig, BertLayer
from ladic_jax.encoders.clip import CLIP
from ladic_jax.families import base
from ladic_jax.families import coca
from ladic_jax.families import guidance
from ladic_jax.families import vocab as vocab_lib
from ladic_jax.models.diffuser import sinusoid_features
from ladic_jax.sharding import path_str, to_host

FUSIONS = ("concat", "add")
METHODS = ("ddim", "refeed")


@dataclasses.dataclass(frozen=True)
class WordDenoiserConfig:
    """Sizes of the denoiser and its condition. ``depth``/``width``/``num_heads``/``mlp_dim`` are the BERT's
    (DistilBERT-base: 6/768/12/3072; BERT-base: 12/768/12/3072)."""
    emb_dim: int
    max_len: int
    width: int = 768
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 3072
    num_cond_tokens: int = 1      # k
    cond_hidden: int = 768        # the condition MLP's hidden width
    fusion: str = "concat"
    time_embedding: bool = True
    num_timesteps: int = 1000
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for name in ("emb_dim", "max_len", "width", "depth", "num_heads", "mlp_dim", "num_cond_tokens", "cond_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"WordDenoiserConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    def bert(self) -> BertConfig:
        return BertConfig(vocab_size=1, hidden_size=self.width, num_layers=self.depth, num_heads=self.num_heads,
                          intermediate_size=self.mlp_dim, max_position_embeddings=self.max_len,
                          layer_norm_eps=self.layer_norm_eps)


class ConditionMLP(nn.Module):
    """A feature (B, F) -> k condition tokens (B, k, width): Linear-ReLU-Dropout-Linear."""
    hidden: int
    num_tokens: int
    width: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feature, deterministic=True):
        h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(feature.astype(self.dtype)))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Dense(self.num_tokens * self.width, dtype=self.dtype, name="fc2")(h)
        return h.reshape(feature.shape[0], self.num_tokens, self.width)


class WordDenoiser(nn.Module):
    """x_t (B, L, emb_dim), timesteps (B,), condition tokens (B, k, width) -> x̂0 (B, L, emb_dim)."""
    config: WordDenoiserConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_t, t, cond, deterministic=True):
        c = self.config
        bsz, length, _ = x_t.shape
        project = c.emb_dim != c.width
        h = x_t.astype(self.dtype)
        if project:
            h = nn.Dense(c.width, dtype=self.dtype, kernel_init=KERNEL_INIT, name="input_up")(h)
        pos = self.param("position_embeddings", KERNEL_INIT, (c.max_len, c.width))
        h = h + pos[:length].astype(self.dtype)
        if c.time_embedding:
            e = sinusoid_features(t, c.width).astype(self.dtype)
            e = nn.Dense(c.width, dtype=self.dtype, name="time_fc2")(
                nn.silu(nn.Dense(c.width, dtype=self.dtype, name="time_fc1")(e)))
            h = h + e[:, None, :]
        types = self.param("segment_embeddings", KERNEL_INIT, (2, c.width))
        cond = cond.astype(self.dtype)
        if c.fusion == "add":
            h = h + jnp.sum(cond, 1, keepdims=True)
        else:
            cond_pos = self.param("cond_position_embeddings", KERNEL_INIT, (c.num_cond_tokens, c.width))
            h = jnp.concatenate([h + types[0], cond + cond_pos.astype(self.dtype) + types[1]], 1)
        h = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="embed_norm")(h)
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        layer_cfg = c.bert()
        for i in range(c.depth):
            h = BertLayer(layer_cfg, dtype=self.dtype, name=f"layers_{i}")(h, None)
        h = h[:, :length]
        if project:
            h = nn.Dense(c.emb_dim, dtype=self.dtype, kernel_init=KERNEL_INIT, name="output_down")(h)
        return h.astype(jnp.float32)


class WordDiffusionModel(nn.Module):
    """All parameters: ``clip`` (frozen), ``words`` (the embedding table), ``head_bias``, ``emb_scale``,
    ``vocab_ids`` (closed vocabulary), ``condition`` (and ``text_condition``, ``null_text`` with CLIP
    text guidance), ``denoiser``."""
    clip_config: Any
    denoiser_config: WordDenoiserConfig
    vocab_size: int            # the tokenizer's: rows of the table
    closed_vocab: int          # K > 0: head and rounding see only these ids
    text_guidance: bool = False
    normalize_feature: bool = True
    embedding_init_std: float = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        c = self.denoiser_config
        self.clip = CLIP(self.clip_config, dtype=self.dtype)
        self.words = nn.Embed(self.vocab_size, c.emb_dim, embedding_init=nn.initializers.normal(self.embedding_init_std),
                              name="words")
        self.head_bias = self.param("head_bias", nn.initializers.zeros, (self.vocab_size,), jnp.float32)
        self.emb_scale = self.param("emb_scale", nn.initializers.ones, (), jnp.float32)
        if self.closed_vocab:
            self.vocab_ids = self.param("vocab_ids", nn.initializers.zeros, (self.closed_vocab,), jnp.float32)
        self.condition = ConditionMLP(c.cond_hidden, c.num_cond_tokens, c.width, c.dropout, self.dtype)
        if self.text_guidance:
            self.text_condition = ConditionMLP(c.cond_hidden, c.num_cond_tokens, c.width, c.dropout, self.dtype)
            self.null_text = self.param("null_text", KERNEL_INIT, (c.num_cond_tokens, c.width))
        self.denoiser = WordDenoiser(c, self.dtype)

    # text space
    def _scale(self):
        return jax.lax.stop_gradient(self.emb_scale)

    def vocab(self):
        return jax.lax.stop_gradient(self.vocab_ids).astype(jnp.int32)

    def table(self):
        """The scaled embeddings of the scored ids (K or V, emb_dim) and their head bias."""
        emb, bias = self.words.embedding, self.head_bias
        if self.closed_vocab:
            ids = self.vocab()
            emb, bias = emb[ids], bias[ids]
        return emb.astype(jnp.float32) / self._scale(), bias

    def embed(self, tokens):
        return self.words(tokens).astype(jnp.float32) / self._scale()

    def logits(self, x):
        emb, bias = self.table()
        logits = x.astype(jnp.float32) @ emb.T + bias
        return vocab_lib.mask_padding(logits, self.vocab()) if self.closed_vocab else logits

    def round(self, x):
        """Index (into the scored ids) of the nearest embedding per position, and that embedding."""
        emb, _ = self.table()
        x = x.astype(jnp.float32)
        d2 = jnp.sum(emb * emb, -1) - 2.0 * x @ emb.T
        index = jnp.argmin(d2, -1)
        return index, emb[index]

    # condition
    def image_feature(self, pixels):
        f = self.clip.get_image_features(pixels).astype(jnp.float32)
        if self.normalize_feature:
            f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        return jax.lax.stop_gradient(f)

    def text_feature(self, ids, mask):
        f = self.clip.get_text_features(ids, mask).astype(jnp.float32)
        if self.normalize_feature:
            f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
        return jax.lax.stop_gradient(f)

    def cond_tokens(self, image_feature, text_feature=None, text_null=None, deterministic=True):
        """The condition tokens (B, k', width); with text guidance the image's k tokens then the text's k
        (a learned null where ``text_null``; the text feature may be None, then the null everywhere)."""
        cond = self.condition(image_feature, deterministic)
        if not self.text_guidance:
            return cond
        bsz = image_feature.shape[0]
        null = jnp.broadcast_to(self.null_text.astype(cond.dtype), (bsz,) + self.null_text.shape)
        if text_feature is None:
            txt = null
        else:
            txt = self.text_condition(text_feature, deterministic)
            if text_null is not None:
                txt = jnp.where(text_null[:, None, None], null, txt)
        return jnp.concatenate([cond, txt], 1)

    def denoise(self, x_t, t, cond, deterministic=True):
        return self.denoiser(x_t, t, cond, deterministic)

    def __call__(self, tokens, token_mask, image):
        feat = self.image_feature(image)
        self.clip.get_text_features(tokens, token_mask)
        x0 = self.embed(tokens)
        cond = self.cond_tokens(feat, feat if self.text_guidance else None)
        if self.closed_vocab:
            self.vocab()
        return self.logits(self.denoise(x0, jnp.zeros((tokens.shape[0],), jnp.int32), cond))


# ---------------------------------------------------------------------------------------------- losses


def mean_sq(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per example, the mean over positions and channels of (a - b)²: (B,)."""
    d = (a - b).astype(jnp.float32)
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example, the mean over positions of -log softmax(logits)[target]: (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], -1)


def x0_loss(x0_hat: jax.Array, x_start: jax.Array, emb: jax.Array, t: jax.Array) -> jax.Array:
    """Diffusion-LM's x0 term, per example: ||x̂0 - x_start||² (mean), and at t = 0 (the first step: the
    x_1 "restoring" term of CLIP-DiffusionLM) ||x̂0 - E[w]||² against the clean embeddings themselves."""
    return jnp.where(t == 0, mean_sq(x0_hat, emb), mean_sq(x0_hat, x_start))


def prior_loss(x_start: jax.Array, abar_last: jax.Array) -> jax.Array:
    """Per example, the mean of (sqrt(ᾱ_T) x_start)²: the mean of q(x_T | x_start) kept near the N(0, I) prior."""
    m = jnp.sqrt(abar_last) * x_start.astype(jnp.float32)
    return jnp.mean(m * m, axis=tuple(range(1, m.ndim)))


# ---------------------------------------------------------------------------------------------- the family


class WordDiffusionFamily(base.Family):
    """The shared machinery; subclasses (``clip_diffusionlm``, ``prefix_diffusion``) set the defaults that
    make them their paper and their loss (``loss_terms``)."""

    #: the condition: k prefix tokens (overridable by config.model.denoiser.num_cond_tokens)
    default_cond_tokens = 1

    def __init__(self, config):
        super().__init__(config)
        self.validate(config)
        m = config.model
        self.clip_config = coca.clip_config(m)
        self.vocab_size = vocab_lib.size(config)
        d = m.denoiser.to_dict()
        d.setdefault("num_cond_tokens", self.default_cond_tokens)
        try:
            self.denoiser_config = WordDenoiserConfig(emb_dim=int(m.text.emb_dim), max_len=config.input.max_length,
                                                      num_timesteps=config.diffusion.num_timesteps, **d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.model.denoiser: {e}") from e
        self.module = WordDiffusionModel(
            self.clip_config, self.denoiser_config, self.tokenizer_vocab_size, self.vocab_size,
            text_guidance=bool(m.get("text_guidance", False)),
            normalize_feature=bool(m.condition.get("normalize", True)),
            embedding_init_std=float(m.text.get("init_std", 1.0)),
            dtype=jnp.dtype(config.get("dtype", "float32")))
        dc = config.diffusion
        self.diffusion = GaussianDiffusion.create(dc.schedule, dc.num_timesteps)

    @classmethod
    def validate(cls, config) -> None:
        c = config_lib
        vocab_lib.validate(config)
        c.check(bool(config.model.clip.get("pretrained")) or bool(config.model.clip.get("config")),
                "config.model.clip", "needs `pretrained` (a CLIP directory or hub id) or `config` (the sizes)")
        c.require_positive(config, "model.text.emb_dim", integer=True)
        c.require_choice(config, "model.denoiser.fusion", FUSIONS)
        for name in ("depth", "width", "num_heads", "mlp_dim", "cond_hidden"):
            c.require_positive(config, f"model.denoiser.{name}", integer=True)
        dropout = c.get_field(config, "model.denoiser.dropout")
        c.check(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "config.model.denoiser.dropout",
                f"must be in [0, 1), got {dropout!r}")
        if "uncond_prob" in config.model:
            p = config.model.uncond_prob
            c.check(isinstance(p, (int, float)) and 0 <= p <= 1, "config.model.uncond_prob", f"must be in [0, 1], got {p!r}")
        c.require_choice(config, "diffusion.schedule", SCHEDULES)
        T = c.require_positive(config, "diffusion.num_timesteps", integer=True)
        steps = c.get_field(config, "sampler.steps")
        c.check(c.is_int(steps) and 1 <= steps <= T, "config.sampler.steps", f"must be an int in 1..{T}, got {steps!r}")
        c.require_choice(config, "sampler.method", METHODS)
        c.require_nonnegative(config, "sampler.eta")
        c.require_nonnegative(config, "sampler.guidance")
        c.check(isinstance(config.sampler.get("clamp", False), bool), "config.sampler.clamp", "must be a bool")
        if config.sampler.get("guidance", 0.0):
            c.check(bool(config.model.get("text_guidance", False)), "config.sampler.guidance",
                    "needs config.model.text_guidance=True (a model trained with the CLIP text condition)")
        for i, n in enumerate(config.eval.sampling_steps if "eval" in config else ()):
            c.check(n <= T, f"config.eval.sampling_steps[{i}]", f"must be at most num_timesteps={T}, got {n}")

    # ---- text space ------------------------------------------------------------------------------

    @property
    def tokenizer_vocab_size(self) -> int:
        return int(self.config.model.text.get("vocab_size") or len(self.tokenizer))

    @functools.cached_property
    def _special_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        return tuple(sorted({tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}))

    def decode(self, token_ids: np.ndarray) -> list[str]:
        """Token ids -> captions: special tokens dropped; with ``model.dedup_consecutive`` every run of one
        repeated word kept once, per caption (the authors' CLIP-DiffusionLM code did this over the whole
        batch at once)."""
        drop = set(self._special_ids)
        out = []
        for row in np.asarray(token_ids):
            ids = [int(i) for i in row if int(i) not in drop]
            words = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True).split()
            if self.config.model.get("dedup_consecutive", False):
                words = [w for j, w in enumerate(words) if j == 0 or words[j - 1] != w]
            out.append(" ".join(words))
        return out

    def _apply(self, params, *args, method, **kw):
        return self.module.apply({"params": params}, *args, method=method, **kw)

    def _to_index(self, params, tokens):
        if not self.vocab_size:
            return tokens, jnp.ones(tokens.shape, bool)
        return vocab_lib.to_index(self._apply(params, method=WordDiffusionModel.vocab), tokens)

    def _to_token_ids(self, params, index):
        if not self.vocab_size:
            return index.astype(jnp.int32)
        return vocab_lib.to_token_ids(self._apply(params, method=WordDiffusionModel.vocab), index)

    # ---- parameters -----------------------------------------------------------------------------
    def init(self, rng, batch):
        b = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
        return self.module.init(rng, b["tokens"], b["token_mask"], b["image"])["params"]

    def load_pretrained(self, abstract_params):
        m = self.config.model
        out, notes = {}, []
        src = m.clip.get("pretrained")
        if src:
            pre = loading.load_pretrained(src, "clip")
            if m.clip.get("config") and pre.config != self.clip_config:
                raise ValueError(f"config.model.clip.config disagrees with the config.json of {src}: "
                                 f"{self.clip_config} vs {pre.config}")
            flat = jax.tree_util.tree_flatten_with_path(pre.params)[0]
            out.update({f"clip/{path_str(p)}": np.asarray(v) for p, v in flat})
            notes.append(f"clip: loaded {len(flat)} tensors from {src}")
        else:
            notes.append("clip: randomly initialised (no config.model.clip.pretrained: a smoke test, not a model)")
        text_src = m.text.get("pretrained")
        if text_src:
            pre = loading.load_pretrained(text_src, "auto")
            table = np.asarray(pre.params["embeddings"]["word_embeddings"]["embedding"])
            if table.shape != (self.tokenizer_vocab_size, self.denoiser_config.emb_dim):
                raise ValueError(f"config.model.text: {text_src}'s word embeddings are {table.shape}, but the model "
                                 f"expects ({self.tokenizer_vocab_size}, {self.denoiser_config.emb_dim}) "
                                 "(the tokenizer's vocabulary x text.emb_dim)")
            out["words/embedding"] = table
            notes.append(f"text: word embeddings {table.shape} from {text_src} (the head tied to them)")
        else:
            notes.append(f"text: {self.denoiser_config.emb_dim}-d word embeddings learned from scratch")
        return out, notes

    def own_clip(self, params):
        return CLIP(self.clip_config), params["clip"], self.clip_config

    @functools.cached_property
    def clip_tokenizer(self):
        """The CLIP's own tokenizer (from its directory: OpenAI's CLIP has its BPE, the exported shapes CLIP
        the input's WordPiece), or the input's for a CLIP without a directory (random, smoke tests)."""
        src = self.config.model.clip.get("pretrained")
        return text_lib.load_tokenizer(src, field="config.model.clip.pretrained") if src else self.tokenizer

    def prepare(self, params, train_batches: Iterator[dict[str, jax.Array]]):
        """The closed vocabulary's ids (one epoch of captions) and, for pretrained embeddings with
        ``text.scale_embeddings``, their RMS over the caption tokens of ``model.stats_batches`` batches."""
        m = self.config.model
        if m.get("text_guidance", False) and self.clip_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError("config.model.text_guidance feeds the caption's token ids to the CLIP's text tower, so "
                             f"the CLIP ({m.clip.pretrained}) must use the input tokenizer "
                             f"({self.config.input.tokenizer}); it does not")
        scale = bool(m.text.get("scale_embeddings", False))
        nb = int(m.get("stats_batches", 20)) if scale else 0
        vocab_batches = vocab_lib.epoch_batches(self.config) if self.vocab_size else 0
        if not nb and not vocab_batches:
            return {}, []
        table = np.asarray(to_host(params["words"]["embedding"]), np.float64)
        seen: set[int] = set()
        sq, count = 0.0, 0
        for i, batch in zip(range(max(nb, vocab_batches)), train_batches):
            tokens = to_host(batch["tokens"])
            if i < nb:
                sq += float(np.sum(table[tokens] ** 2))
                count += tokens.size * table.shape[1]
            if self.vocab_size:
                seen.update(np.unique(tokens).tolist())
        out, notes = {}, []
        if nb:
            rms = float(np.sqrt(sq / max(count, 1)))
            out["emb_scale"] = np.asarray(rms, np.float32)
            notes.append(f"word embeddings scaled by 1/{rms:.4f} (their RMS over {count // table.shape[1]} caption "
                         "tokens) to unit scale per channel")
        if self.vocab_size:
            tok = self.tokenizer
            out["vocab_ids"], note = vocab_lib.build(seen, (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id),
                                                     self.vocab_size)
            notes.append(note)
        return out, notes

    # ---- training ---------------------------------------------------------------------------------
    def loss_terms(self, *, x0_hat, x_start, emb, t, logits_hat, logits_start, targets) -> dict[str, jax.Array]:
        """The family's weighted loss terms (per example (B,)); the loss is their sum."""
        raise NotImplementedError

    def loss(self, params, batch, rng, train=True):
        m = self.config.model
        tokens, token_mask = batch["tokens"], batch["token_mask"]
        bsz = tokens.shape[0]
        k_t, k_start, k_noise, k_null, k_drop = jax.random.split(rng, 5)
        emb = self._apply(params, tokens, method=WordDiffusionModel.embed)
        # x_start ~ q(x_0 | w) = N(E[w], 1 - ᾱ_0): the embedding with the first step's noise (Diffusion-LM).
        sigma0 = jnp.sqrt(self.diffusion.one_minus_alphas_cumprod[0])
        x_start = emb + sigma0 * jax.random.normal(k_start, emb.shape, emb.dtype)
        t = jax.random.randint(k_t, (bsz,), 0, self.diffusion.num_timesteps)
        x_t = self.diffusion.q_sample(x_start, t, jax.random.normal(k_noise, emb.shape, emb.dtype))
        feat = self._apply(params, batch["image"], method=WordDiffusionModel.image_feature)
        text_feat = text_null = None
        if m.get("text_guidance", False):
            text_feat = self._apply(params, tokens, token_mask, method=WordDiffusionModel.text_feature)
            text_null = (jax.random.bernoulli(k_null, m.get("uncond_prob", 0.2), (bsz,)) if train
                         else jnp.zeros((bsz,), bool))
        rngs = {"dropout": k_drop}
        cond = self._apply(params, feat, text_feat, text_null, not train, method=WordDiffusionModel.cond_tokens,
                           rngs=rngs)
        x0_hat = self._apply(params, x_t, t, cond, not train, method=WordDiffusionModel.denoise, rngs=rngs)
        index, known = self._to_index(params, tokens)
        logits_hat = self._apply(params, x0_hat, method=WordDiffusionModel.logits)
        logits_start = self._apply(params, x_start, method=WordDiffusionModel.logits)
        terms = self.loss_terms(x0_hat=x0_hat, x_start=x_start, emb=emb, t=t, logits_hat=logits_hat,
                                logits_start=logits_start, targets=index)
        loss = sum(jnp.mean(v) for v in terms.values())
        metrics = {k: jnp.mean(v) for k, v in terms.items()}
        metrics["token_acc"] = jnp.mean((jnp.argmax(logits_hat, -1) == index) & known)
        if self.vocab_size:
            metrics["out_of_vocab"] = 1.0 - jnp.mean(known)
        return loss, metrics

    # ---- sampling --------------------------------------------------------------------------------
    def timesteps(self, sampler_cfg):
        return self.diffusion.sampling_timesteps(int(sampler_cfg.steps))

    def sampling_context(self, params, batch, sampler_cfg):
        feat = self._apply(params, batch["image"], method=WordDiffusionModel.image_feature)
        if not self.config.model.get("text_guidance", False):
            return {"cond": self._apply(params, feat, method=WordDiffusionModel.cond_tokens)}
        # With CLIP text guidance the caption is unknown at sampling: its slot takes the image's CLIP feature
        # (CLIP puts both in one space), the unconditional branch the learned null.
        ctx = {"cond": self._apply(params, feat, feat, method=WordDiffusionModel.cond_tokens)}
        if sampler_cfg.get("guidance", 0.0):
            null = self._apply(params, feat, None, method=WordDiffusionModel.cond_tokens)
            ctx.update(guidance.context(ctx["cond"], null, sampler_cfg))
        return ctx

    def initial_state(self, params, context, rng, sampler_cfg):
        bsz = context["cond"].shape[0]
        x = jax.random.normal(rng, (bsz, self.config.input.max_length, self.denoiser_config.emb_dim), jnp.float32)
        return {"x": x, "x0_hat": jnp.zeros_like(x)}

    def denoise_step(self, params, context, state, t, t_next, rng, sampler_cfg):
        x = state["x"]
        bsz = x.shape[0]
        tb, tnb = jnp.full((bsz,), t, jnp.int32), jnp.full((bsz,), t_next, jnp.int32)
        f = lambda x, tb, cond: self._apply(params, x, tb, cond, method=WordDiffusionModel.denoise)  # noqa: E731
        w = float(sampler_cfg.get("guidance", 0.0))
        x0_hat = guidance.combine(f, (x, tb), context, w) if w else f(x, tb, context["cond"])
        if sampler_cfg.get("clamp", False):
            x0_hat = self._apply(params, x0_hat, method=WordDiffusionModel.round)[1]
        if sampler_cfg.method == "refeed":
            x = x0_hat
        else:
            x = self.diffusion.ddim_step(x, x0_hat, tb, tnb, sampler_cfg.eta, rng)
        return {"x": x, "x0_hat": x0_hat}

    def finalize(self, params, context, state, sampler_cfg):
        return self.prediction(params, context, state, sampler_cfg)[0]

    def prediction(self, params, context, state, sampler_cfg):
        """The tokens of the prediction x̂0 by the head's argmax (both papers decode so; clamping during
        sampling uses the nearest embedding instead), and x̂0."""
        logits = self._apply(params, state["x0_hat"], method=WordDiffusionModel.logits)
        return self._to_token_ids(params, jnp.argmax(logits, -1)), state["x0_hat"]
