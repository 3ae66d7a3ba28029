"""``mc_diffusion``: MC-Diffusion (seed 002) — discrete diffusion over caption tokens conditioned on VQ image codes,
with the Masked Condition Strategy.

- Text: the caption's token ids (the config's tokenizer), as K classes (a closed vocabulary of the training
  captions, ``families.vocab``, or the tokenizer's), every one of the L positions diffused (padding is a
  class the model learns to put after the end token). The process is ``diffusion.discrete``'s
  mask-and-replace (VQ-Diffusion; or the absorbing variant) with T steps.
- Image: discrete codes of a frozen image tokenizer, computed on the fly from the input images: the small
  VQ-VAE trained on the data (``configs/vqvae_shapes.py``, exported by ``ladic-convert vqvae``) or a
  pretrained VQGAN in the diffusers ``VQModel`` layout (``encoders.vqgan``). The path's contents say which.
- Denoiser: ``models.discrete_denoiser`` (the diffuser's blocks; cross-attention to the embedded codes),
  predicting x̂0 logits; loss = VLB (KL of the posteriors, NLL at t = 0) weighted by 1/(T·p_t) for
  importance-sampled t (uniform until every t has been seen ``min_count`` times; the per-t loss history is a
  frozen parameter updated by the step, ``base.STATE_UPDATES``), + ``aux_weight`` × the x0 cross-entropy.
- **Masked Condition Strategy** (training): per example, with probability ``p_cond`` each image code is
  replaced by [MASK] with probability ``p_mask`` (0.1 and 0.1 in the paper); with probability ``p_null``
  (disjoint) all of them are — the null condition of classifier-free guidance, trained in the same model
  so that the two guidances compare on one checkpoint.
- **Guidance** (sampling, ``sampler.guidance`` = s, s = 1: the conditional model alone):
      log p̃(x0 | x_t) = log p(x0 | x_t, y_weak) + s · (log p(x0 | x_t, y) − log p(x0 | x_t, y_weak))
  with y_weak the masked condition (``sampler.guidance_kind = "mcs"``; a fresh mask at rate
  ``sampler.mcs_mask_rate`` each step) or the null one (``"cfg"``). This is the paper's classifier-free
  guidance definition, (1 − s) log p(x|∅) + s log p(x|y), with y_weak in place of ∅. The paper writes MCS
  as s·log p(x|y_M) + (1 − s)·log p(x|y), with s and 1 − s swapped with respect to its own CFG: read
  literally, s > 1 pushes away from the full condition toward the masked one. ``sampler.mcs_literal = True``
  samples with that reading, for comparison. Both passes of a guided step run as one batched call.
- Sampling: the shared loop over ``sampler.steps`` (<= T) timesteps evenly spaced from T − 1 to 0, each step
  drawing x_s from the closed-form posterior q(x_s | x_t, x̂0) (skipping the steps between), the last step
  taking the argmax of x̂0. Starts from all [MASK]. ``sampler.truncation`` = r < 1 keeps only the classes
  in the top r of x̂0's mass before the posterior (VQ-Diffusion's truncation sampling; 1 = off).

Config (``config.model``): image_tokenizer (path: a VQ-VAE export or a diffusers VQModel directory; or
kind "vqvae"/"vqgan" + config sizes, randomly initialised: for AOT and tests), code_embedding ("codebook":
a projection of the frozen VQ codebook vectors; "learned": a table), code_encoder_depth (self-attention
blocks over the code tokens before the cross-attention; 0 = none, as the paper), denoiser (preset + overrides),
vocab/max_vocab (and vocab_size: the tokenizer's, stated), diffusion (num_timesteps, kind, schedule ends att_1/att_T/ctt_1/ctt_T, timestep_sampling
"importance" | "uniform", min_count), aux_weight, p_cond, p_mask, p_null.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax.diffusion import discrete
from ladic_jax.encoders import vqgan as vqgan_lib
from ladic_jax.families import base
from ladic_jax.families import guidance
from ladic_jax.families import vocab as vocab_lib
from ladic_jax.models import vqvae as vqvae_lib
from ladic_jax.models.diffuser import DiffuserConfig
from ladic_jax.models.discrete_denoiser import CODE_EMBEDDINGS, DiscreteDenoiser
from ladic_jax.sharding import path_str, to_host

GUIDANCE_KINDS = ("mcs", "cfg")
TIMESTEP_SAMPLING = ("importance", "uniform")
TOKENIZER_KINDS = ("vqvae", "vqgan")


# ------------------------------------------------------------------------------------- the image tokenizer


class ImageTokenizer:
    """A frozen image -> discrete codes model: its kind, Flax module, sizes and the pixel normalisation it
    expects; with ``params`` when read from a directory."""

    def __init__(self, spec, image_size: int):
        path = spec.get("path") or ""
        self.params = None
        if path:
            root = Path(path)
            if vqvae_lib.is_vqvae_dir(path):
                self.kind = "vqvae"
                cfg, self.params, pre = vqvae_lib.load_vqvae(path)
                self.mean, self.std = pre["image_mean"], pre["image_std"]
            elif (root / vqgan_lib.CONFIG_FILE).is_file():
                self.kind = "vqgan"
                cfg, self.params = vqgan_lib.load_vqgan(path)
                self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # VQGANs read [-1, 1]
            else:
                raise FileNotFoundError(
                    f"config.model.image_tokenizer.path={path!r}: neither a VQ-VAE export ({vqvae_lib.CONFIG_FILE}, "
                    f"from `ladic-convert vqvae`) nor a diffusers VQModel directory ({vqgan_lib.CONFIG_FILE} + "
                    f"{vqgan_lib.WEIGHTS_FILE}) is there")
        else:
            self.kind = spec.get("kind", "")
            config_lib.check(self.kind in TOKENIZER_KINDS, "config.model.image_tokenizer",
                             f"needs `path` (a VQ-VAE export or a diffusers VQModel directory) or `kind` "
                             f"({' | '.join(TOKENIZER_KINDS)}) with `config` (sizes, randomly initialised)")
            sizes = dict(spec.get("config") or {})
            if self.kind == "vqvae":
                cfg = vqvae_lib.VQVAEConfig(**{k: tuple(v) if k == "channels" else v for k, v in sizes.items()})
            else:
                cfg = vqgan_lib.VQGANConfig.from_dict(sizes)
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.config = cfg
        if self.kind == "vqvae":
            self.module, self.num_codes, factor = vqvae_lib.VQVAE(cfg), cfg.num_codes, cfg.downsampling
        else:
            self.module, self.num_codes, factor = vqgan_lib.VQGANEncoder(cfg), cfg.num_vq_embeddings, cfg.downsample_factor
        config_lib.check(image_size % factor == 0, "config.input.image_size",
                         f"is {image_size}, not a multiple of the image tokenizer's downsampling {factor}")
        self.grid = image_size // factor
        self.num_tokens = self.grid * self.grid


class MCModel(nn.Module):
    tokenizer_module: nn.Module    # ImageTokenizer.module, the submodule ``image_tokenizer``
    tokenizer_kind: str
    num_codes: int
    num_image_tokens: int
    denoiser_config: DiffuserConfig
    num_classes: int
    closed_vocab: bool
    num_timesteps: int
    code_embedding: str
    code_encoder_depth: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        self.image_tokenizer = self.tokenizer_module.clone()
        self.denoiser = DiscreteDenoiser(self.denoiser_config, self.num_classes, self.num_codes,
                                         self.num_image_tokens, self.code_embedding, self.code_encoder_depth,
                                         dtype=self.dtype)
        if self.closed_vocab:
            self.vocab_ids = self.param("vocab_ids", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        self.loss_history = self.param("loss_history", nn.initializers.zeros, (self.num_timesteps,), jnp.float32)
        self.loss_counts = self.param("loss_counts", nn.initializers.zeros, (self.num_timesteps,), jnp.float32)

    def codes(self, images):
        m = self.image_tokenizer
        return m.codes(images).reshape(images.shape[0], -1)

    def _codebook(self):
        if self.code_embedding != "codebook":
            return None
        m = self.image_tokenizer
        return m.quantizer.codebook if self.tokenizer_kind == "vqvae" else m.codebook

    def condition(self, codes):
        return self.denoiser.condition(codes, self._codebook())

    def denoise(self, x_t, t, cond, deterministic=True):
        return self.denoiser.denoise(x_t, t, cond, deterministic)

    def vocab(self):
        return self.vocab_ids

    def history(self):
        return self.loss_history, self.loss_counts

    def __call__(self, classes, images):
        codes = self.codes(images)
        if self.tokenizer_kind == "vqvae":  # create the decoder's parameters too (one layout with the export)
            self.image_tokenizer(images)
        t = jnp.zeros((classes.shape[0],), jnp.int32)
        return self.denoise(classes, t, self.condition(codes)), self.history()


def mask_condition(rng: jax.Array, codes: jax.Array, mask_id: int, p_cond: float, p_mask: float,
                   p_null: float = 0.0) -> jax.Array:
    """The Masked Condition Strategy on image codes (B, N): per example, with probability ``p_null`` every
    code becomes ``mask_id`` (the null condition); else with probability ``p_cond`` each code becomes it with
    probability ``p_mask``; else the codes are kept."""
    k_ex, k_tok = jax.random.split(rng)
    u = jax.random.uniform(k_ex, (codes.shape[0], 1))
    null = u < p_null
    partial = (u >= p_null) & (u < p_null + p_cond)
    drop = jax.random.uniform(k_tok, codes.shape) < p_mask
    return jnp.where(null | (partial & drop), mask_id, codes)


# ---------------------------------------------------------------------------------------------- the family


@base.register
class MCDiffusion(base.Family):
    name = "mc_diffusion"
    feature_field, feature_params = "image_codes", r"^image_tokenizer/"

    def __init__(self, config):
        super().__init__(config)
        self.validate(config)
        m = config.model
        self.image_tokenizer = ImageTokenizer(m.image_tokenizer, config.input.image_size)
        self.vocab_size = vocab_lib.size(config)
        # K: the closed vocabulary's size, or the tokenizer's (``model.vocab_size`` states it, so that the model
        # builds without the tokenizer at hand, e.g. for AOT fit checks; checked against it when loaded)
        self.num_classes = self.vocab_size or m.get("vocab_size") or self.tokenizer.vocab_size
        d = m.diffusion
        ends = {k: d[k] for k in ("att_1", "att_T", "ctt_1", "ctt_T") if d.get(k) is not None}
        try:
            self.schedule = discrete.make_schedule(self.num_classes, int(d.num_timesteps), d.get("kind", "mask_replace"),
                                                   **ends)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.model.diffusion: {e}") from None
        dn = m.denoiser
        overrides = dict(dn.get("overrides", {}))
        width = DiffuserConfig.preset(dn.preset, 1, 1, 1, **overrides).width
        self.denoiser_config = DiffuserConfig.preset(dn.preset, latent_dim=1, cond_dim=width,
                                                     max_len=config.input.max_length, **overrides)
        tok = self.image_tokenizer
        self.module = MCModel(tok.module, tok.kind, tok.num_codes, tok.num_tokens, self.denoiser_config, self.num_classes, bool(self.vocab_size),
                              int(d.num_timesteps), m.get("code_embedding", "codebook"),
                              int(m.get("code_encoder_depth", 0)),
                              dtype=jnp.dtype(config.get("dtype", "float32")))
        inp = config.input
        # input normalisation -> [0, 1] -> the tokenizer's normalisation
        mean_in, std_in = np.asarray(inp.image_mean, np.float32), np.asarray(inp.image_std, np.float32)
        mean_t = np.asarray(self.image_tokenizer.mean, np.float32)
        std_t = np.asarray(self.image_tokenizer.std, np.float32)
        self._pixel_scale, self._pixel_shift = std_in / std_t, (mean_in - mean_t) / std_t

    @staticmethod
    def validate(config) -> None:
        c = config_lib
        m = config.model
        vocab_lib.validate(config)
        c.check("image_tokenizer" in m, "config.model.image_tokenizer",
                "is missing: a VQ-VAE export / diffusers VQModel directory (path) or kind + config")
        c.require_choice(config, "model.code_embedding", CODE_EMBEDDINGS)
        if "code_encoder_depth" in m:
            c.require_nonnegative(config, "model.code_encoder_depth", integer=True)
        T = c.require_positive(config, "model.diffusion.num_timesteps", integer=True)
        c.require_choice(config, "model.diffusion.kind", discrete.KINDS)
        c.require_choice(config, "model.diffusion.timestep_sampling", TIMESTEP_SAMPLING)
        c.require_positive(config, "model.diffusion.min_count", integer=True)
        c.require_nonnegative(config, "model.aux_weight")
        for name in ("p_cond", "p_mask", "p_null"):
            v = c.get_field(config, f"model.{name}")
            c.check(isinstance(v, (int, float)) and 0 <= v <= 1, f"config.model.{name}", f"must be in [0, 1], got {v!r}")
        c.check(m.p_cond + m.p_null <= 1, "config.model.p_cond", f"+ p_null must be at most 1, got {m.p_cond + m.p_null}")
        steps = c.get_field(config, "sampler.steps")
        c.check(c.is_int(steps) and 1 <= steps <= T, "config.sampler.steps",
                f"must be an int in 1..{T} (model.diffusion.num_timesteps), got {steps!r}")
        for i, n in enumerate(config.eval.sampling_steps if "eval" in config else ()):
            c.check(n <= T, f"config.eval.sampling_steps[{i}]", f"must be at most model.diffusion.num_timesteps = {T}")
        s = c.get_field(config, "sampler.guidance")
        c.check(isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 0, "config.sampler.guidance",
                f"must be a number >= 0 (s; 1 = the conditional model alone), got {s!r}")
        c.require_choice(config, "sampler.guidance_kind", GUIDANCE_KINDS)
        rate = c.get_field(config, "sampler.mcs_mask_rate")
        c.check(isinstance(rate, (int, float)) and 0 < rate <= 1, "config.sampler.mcs_mask_rate",
                f"must be in (0, 1], got {rate!r}")
        trunc = config.sampler.get("truncation", 1.0)
        c.check(isinstance(trunc, (int, float)) and 0 < trunc <= 1, "config.sampler.truncation",
                f"must be in (0, 1] (the x0 probability mass kept; 1 = all), got {trunc!r}")
        lit = config.sampler.get("mcs_literal", False)
        c.check(isinstance(lit, bool), "config.sampler.mcs_literal", f"must be a bool, got {lit!r}")
        br = config.sampler.get("back_refine")
        c.check(br is None or not br.get("enabled", False), "config.sampler.back_refine.enabled",
                "is not supported by the discrete family")
        c.check("code_cache" not in m, "config.model.code_cache",
                "is now config.feature_cache.kind ('memory' | 'disk' | 'off'), shared by the families")
        frozen = list(config.optim.get("frozen", []))
        for name in ("image_tokenizer/x", "loss_history", "loss_counts") + (("vocab_ids",) if m.vocab == "train" else ()):
            c.check(any(re.search(p, name) for p in frozen), "config.optim.frozen",
                    f"must match {name!r} (set by loading / data / the step, never by the optimizer)")

    # ---- text --------------------------------------------------------------------------------------
    def decode(self, token_ids: np.ndarray) -> list[str]:
        return self.decode_to_end(token_ids)

    def _check_vocab_size(self) -> None:
        if not self.vocab_size and len(self.tokenizer) > self.num_classes:
            raise config_lib.ConfigError(
                f"config.model.vocab_size={self.num_classes} is smaller than tokenizer "
                f"{self.config.input.tokenizer!r}'s {len(self.tokenizer)} ids")

    def _apply(self, params, *args, method, **kw):
        return self.module.apply({"params": params}, *args, method=method, **kw)

    def _to_classes(self, params, tokens):
        if not self.vocab_size:
            return tokens, jnp.ones(tokens.shape, bool)
        return vocab_lib.to_index(self._apply(params, method=MCModel.vocab), tokens)

    def _to_token_ids(self, params, classes):
        if not self.vocab_size:
            return classes
        return vocab_lib.to_token_ids(self._apply(params, method=MCModel.vocab), classes)

    def _logits(self, params, x_t, t, cond, deterministic=True, rng=None):
        logits = self._apply(params, x_t, t, cond, deterministic, method=MCModel.denoise,
                             rngs=None if rng is None else {"dropout": rng})
        if self.vocab_size:
            logits = vocab_lib.mask_padding(logits, self._apply(params, method=MCModel.vocab))
        return logits

    # ---- parameters --------------------------------------------------------------------------------
    def init(self, rng, batch):
        L = batch["tokens"].shape[1]
        return self.module.init(rng, jnp.zeros((1, L), jnp.int32), jnp.zeros(batch["image"].shape, jnp.float32))["params"]

    def load_pretrained(self, abstract_params):
        tok = self.image_tokenizer
        if tok.params is None:
            return {}, [f"image tokenizer ({tok.kind}): randomly initialised (no path)"]
        flat = jax.tree_util.tree_flatten_with_path(tok.params)[0]
        return ({f"image_tokenizer/{path_str(p)}": np.asarray(v) for p, v in flat},
                [f"image tokenizer ({tok.kind}, {tok.grid}x{tok.grid} codes of {tok.num_codes}): loaded "
                 f"{len(flat)} tensors from {self.config.model.image_tokenizer.path}"])

    def prepare(self, params, train_batches: Iterator[dict[str, jax.Array]]):
        """The closed vocabulary: the token ids of one epoch of training captions."""
        self._check_vocab_size()
        if not self.vocab_size:
            return {}, []
        seen: set[int] = set()
        for batch in itertools.islice(train_batches, vocab_lib.epoch_batches(self.config)):
            seen.update(np.unique(to_host(batch["tokens"])).tolist())
        start, end, pad = self.start_end_pad
        vocab_ids, note = vocab_lib.build(seen, (pad, start, end), self.vocab_size)
        return {"vocab_ids": vocab_ids}, [note]

    def frozen_features(self, params, images):
        return self.image_codes(params, images)

    def image_codes(self, params, images):
        """(B, N) int32 codes of images in the input pipeline's normalisation (never differentiated)."""
        x = images * self._pixel_scale + self._pixel_shift
        return jax.lax.stop_gradient(self._apply(params, x, method=MCModel.codes))

    # ---- training -----------------------------------------------------------------------------------
    def loss(self, params, batch, rng, train=True):
        m, d = self.config.model, self.config.model.diffusion
        T = self.schedule.num_timesteps
        classes, known = self._to_classes(params, batch["tokens"])
        B = classes.shape[0]
        k_mask, k_t, k_q, k_drop = jax.random.split(rng, 4)
        if "image_codes" in batch:  # cached by the trainer (ladic_jax.feature_cache)
            codes = batch["image_codes"].astype(jnp.int32)
        else:
            codes = self.image_codes(params, batch["image"])
        if train:
            codes = mask_condition(k_mask, codes, self.image_tokenizer.num_codes, m.p_cond, m.p_mask, m.p_null)
        history, counts = self._apply(params, method=MCModel.history)
        importance = d.timestep_sampling == "importance"
        t, pt = discrete.sample_timesteps(k_t, B, T, history if importance else None, counts if importance else None,
                                          min_count=int(d.min_count))
        x_t = discrete.q_sample(self.schedule, classes, t, k_q)
        cond = self._apply(params, codes, method=MCModel.condition)
        logits = self._logits(params, x_t, t, cond, deterministic=not train, rng=k_drop)
        terms = discrete.losses(self.schedule, logits, classes, x_t, t, weights=known.astype(jnp.float32))
        vlb = jnp.mean(terms["vlb"] / (T * pt))
        ce = jnp.mean(terms["x0_ce"])
        loss = vlb + m.aux_weight * ce
        hit = (jnp.argmax(logits, -1) == classes) & known
        masked = x_t == self.schedule.mask_id
        metrics = {"vlb": jnp.mean(terms["vlb"]), "vlb_weighted": vlb, "x0_ce": ce,
                   "token_acc": jnp.sum(hit) / jnp.maximum(jnp.sum(known), 1),
                   "masked_token_acc": jnp.sum(hit & masked) / jnp.maximum(jnp.sum(masked & known), 1),
                   "t_importance": jnp.all(counts >= d.min_count).astype(jnp.float32)}
        if self.vocab_size:
            metrics["out_of_vocab"] = 1.0 - jnp.mean(known)
        if train:
            new_h, new_c = discrete.update_loss_history(history, counts, t, terms["vlb"])
            metrics[base.STATE_UPDATES] = {"loss_history": new_h, "loss_counts": new_c}
        return loss, metrics

    # ---- sampling -----------------------------------------------------------------------------------
    def timesteps(self, sampler_cfg):
        T, S = self.schedule.num_timesteps, int(sampler_cfg.steps)
        return np.round(np.linspace(T - 1, 0, S)).astype(np.int32) if S > 1 else np.array([T - 1], np.int32)

    def _guided(self, sampler_cfg) -> bool:
        return float(sampler_cfg.guidance) != 1.0

    def sampling_context(self, params, batch, sampler_cfg):
        codes = self.image_codes(params, batch["image"])
        ctx = {"codes": codes, "cond": self._apply(params, codes, method=MCModel.condition)}
        if self._guided(sampler_cfg) and sampler_cfg.guidance_kind == "cfg":
            # The null condition is the same for every image: its keys/values once, broadcast over the batch.
            null = jnp.full((1, codes.shape[1]), self.image_tokenizer.num_codes, jnp.int32)
            kv = self._apply(params, null, method=MCModel.condition)
            ctx["weak"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (codes.shape[0],) + a.shape[1:]), kv)
        return ctx

    def initial_state(self, params, context, rng, sampler_cfg):
        B = context["codes"].shape[0]
        return jnp.full((B, self.config.input.max_length), self.schedule.mask_id, jnp.int32)

    def log_x0(self, params, context, x, t, rng, sampler_cfg):
        """log p̃(x0 | x_t), guided as ``sampler.guidance`` says (one batched call for both passes)."""
        B = x.shape[0]
        tt = jnp.full((B,), t, jnp.int32)
        if not self._guided(sampler_cfg):
            return jax.nn.log_softmax(self._logits(params, x, tt, context["cond"]))
        if sampler_cfg.guidance_kind == "cfg":
            weak = context["weak"]
        else:
            masked = mask_condition(rng, context["codes"], self.image_tokenizer.num_codes, 1.0,
                                    float(sampler_cfg.mcs_mask_rate))
            weak = self._apply(params, masked, method=MCModel.condition)
        logits = self._logits(params, guidance.pair_rows(x, x), guidance.pair_rows(tt, tt),
                              guidance.pair_rows(context["cond"], weak))
        log_cond, log_weak = guidance.unpair_rows(jax.nn.log_softmax(logits))
        s = float(sampler_cfg.guidance)
        if sampler_cfg.get("mcs_literal", False):  # s·log p(x|y_M) + (1 − s)·log p(x|y), as the paper prints it
            return discrete.guided_log_probs(log_weak, log_cond, s)
        return discrete.guided_log_probs(log_cond, log_weak, s)

    def denoise_step(self, params, context, state, t, t_next, rng, sampler_cfg):
        k_mask, k_step = jax.random.split(rng)
        log_p = self.log_x0(params, context, state, t, k_mask, sampler_cfg)
        log_p = discrete.truncate_log_probs(log_p, float(sampler_cfg.get("truncation", 1.0)))
        B = state.shape[0]
        return discrete.denoise_step(self.schedule, log_p, state, jnp.full((B,), t, jnp.int32),
                                     jnp.full((B,), t_next, jnp.int32), k_step)

    def finalize(self, params, context, state, sampler_cfg):
        # (a last step always ends at t_next = -1, which leaves no [MASK]; clip for safety)
        return self._to_token_ids(params, jnp.minimum(state, self.num_classes - 1)).astype(jnp.int32)
