"""Prefix-diffusion (seed 003): Diffusion-LM on learned word embeddings, conditioned on k prefix tokens
mapped from a CLIP image feature (``word_diffusion`` holds the shared machinery).

- Text space: learned embeddings (48-d in the paper, N(0, 1) init as Diffusion-LM) trained end to end
  with the head tied to them.
- Condition: CLIP feature -> MLP (Linear-ReLU-Dropout-Linear) -> k = 5 prefix tokens with their own
  position and segment embeddings, concatenated after the up-projected noisy text tokens; denoiser: a
  BERT-base-shaped encoder from scratch; output down-projected to the embedding size.
- Schedules ``trunc_lin`` / ``trunc_cos`` (``diffusion.gaussian``).
- Loss (Diffusion-LM's), per example: the x0 MSE against x_start (at t = 0 against the embeddings), the
  decoder NLL -log p(w | x_start) of the tied head, and the prior term mean((sqrt(ᾱ_T) x_start)²).
- Sampling: DDIM with the prediction clamped to its nearest embeddings at every step
  (``sampler.clamp``); ``sampler.mbr`` candidates per image, the one of highest CLIP image-text cosine
  kept (``sampler.mbr_metric = "clip"``, the family's own CLIP; the authors' code has this call
  commented out).
"""

from __future__ import annotations

from ladic_jax.families import base
from ladic_jax.families import word_diffusion as wd


@base.register
class PrefixDiffusion(wd.WordDiffusionFamily):
    name = "prefix_diffusion"
    default_cond_tokens = 5

    def loss_terms(self, *, x0_hat, x_start, emb, t, logits_hat, logits_start, targets):
        abar_last = self.diffusion.alphas_cumprod[-1]
        return {"x0_mse": wd.x0_loss(x0_hat, x_start, emb, t),
                "decoder_nll": wd.token_nll(logits_start, targets),
                "prior": wd.prior_loss(x_start, abar_last)}
