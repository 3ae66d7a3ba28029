"""CLIP-DiffusionLM (seed 000): continuous diffusion on frozen pretrained word embeddings, conditioned on
a CLIP image feature appended as an extra token (``word_diffusion`` holds the shared machinery).

- Text space: frozen pretrained word embeddings with the head tied to them and frozen (the paper:
  DistilBERT-base's 768-d; on the embedded data the packaged MiniLM's 384-d), scaled to unit RMS
  (``text.scale_embeddings``; the paper feeds them raw).
- Denoiser: a DistilBERT-shaped encoder from random init; condition: CLIP image feature -> MLP -> one
  token, ``concat`` (the paper's best: 0.2337 vs 0.1948 BLEU-4 for ``add`` on Flickr30k+8k) or ``add``.
- ``model.text_guidance``: the CLIP text feature of the caption as a second condition token, dropped to
  a learned null with ``model.uncond_prob`` (paper: 0.2), for classifier-free guidance (paper: did not
  help); at sampling its slot takes the image's CLIP feature, and ``sampler.guidance`` = w.
- Timestep: ``model.denoiser.time_embedding`` (default on: the paper writes μθ(x_t, t), and DDIM at
  any step count needs to know the noise level; the authors' code feeds no timestep: ``False``).
- Loss: L'_simple + λ L_R, per example: the x0 MSE against x_start (at t = 0 against the clean
  embeddings: the x_1 restoring term) plus λ (``model.rounding_weight``; 0.5 final, 0.3 baseline) times
  the rounding cross-entropy of the tied head on the prediction x̂0.
- Sampling: ``refeed`` (the paper: x̂0 fed back ``steps`` = 5 times) or ``ddim``; consecutive repeated
  words removed per caption (``model.dedup_consecutive``).
"""

from __future__ import annotations

from ladic_jax import config as config_lib
from ladic_jax.families import base
from ladic_jax.families import word_diffusion as wd


@base.register
class ClipDiffusionLM(wd.WordDiffusionFamily):
    name = "clip_diffusionlm"
    default_cond_tokens = 1

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        config_lib.require_nonnegative(config, "model.rounding_weight")

    def loss_terms(self, *, x0_hat, x_start, emb, t, logits_hat, logits_start, targets):
        lam = float(self.config.model.rounding_weight)
        return {"x0_mse": wd.x0_loss(x0_hat, x_start, emb, t),
                "rounding_ce": lam * wd.token_nll(logits_hat, targets)}
