"""Vector quantisation: nearest-codebook lookup, the straight-through estimator, and EMA codebook updates.

Shared by the small VQ-VAE trained on the data (``ladic_jax.models.vqvae``) and the pretrained VQGAN
encoder loaded for real data (``ladic_jax.encoders.vqgan``): both map encoder vectors to the index of
their nearest codebook entry.

    codes = nearest_codes(z, codebook)              z (..., D), codebook (K, D) -> (...) int32
    z_q   = straight_through(z, codebook[codes])    forward: the code vectors; backward: identity to z

EMA updates (van den Oord et al. 2017, appendix; Razavi et al. 2019): per code, the decayed count of the
vectors assigned to it (``cluster_size``) and their decayed sum (``embed_sum``); the codebook is their
ratio, with Laplace smoothing of the counts so that an unused code never divides by zero. Codes whose
decayed count falls below a threshold are dead (no vector has been near them for a while): ``restart_dead``
moves each to a random vector of the current batch (as Jukebox does), so that the codebook does not
collapse onto the few codes the first steps happened to use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """||z - e_k||² for every vector of z (..., D) and code e_k of codebook (K, D): (..., K) float32.

    Expanded as ||z||² - 2 z·e + ||e||² so that no (..., K, D) difference tensor is formed."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    return (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ e.T + jnp.sum(e * e, -1))


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook entry (squared Euclidean) for each vector of z (..., D): (...) int32."""
    return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """z_q in the forward pass; the gradient passes to z unchanged (z + stop_gradient(z_q - z))."""
    return z + jax.lax.stop_gradient(z_q - z)


def codebook_usage(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
    """How much of the codebook a batch of codes uses: ``used`` (fraction of the K codes hit at least once)
    and ``perplexity`` (exp of the entropy of the code histogram; K when all are used evenly)."""
    counts = jnp.bincount(codes.reshape(-1), length=num_codes).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"used": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


def ema_update(cluster_size: jax.Array, embed_sum: jax.Array, z: jax.Array, codes: jax.Array,
               decay: float, eps: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA step of the codebook statistics from the vectors z (N, D) assigned to ``codes`` (N,).

    Returns the new (cluster_size (K,), embed_sum (K, D), codebook (K, D)):
      cluster_size <- decay·cluster_size + (1 - decay)·n_k          n_k: vectors assigned to code k
      embed_sum    <- decay·embed_sum    + (1 - decay)·Σ_{i→k} z_i
      codebook_k    = embed_sum_k / ñ_k,  ñ = (cluster_size + eps) / (Σ cluster_size + K·eps) · Σ cluster_size
    """
    k = cluster_size.shape[0]
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    onehot = jax.nn.one_hot(codes.reshape(-1), k, dtype=jnp.float32)
    n = jnp.sum(onehot, 0)
    cluster_size = decay * cluster_size + (1.0 - decay) * n
    embed_sum = decay * embed_sum + (1.0 - decay) * onehot.T @ z
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead(cluster_size: jax.Array, embed_sum: jax.Array, codebook: jax.Array, z: jax.Array,
                 rng: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Codes with ``cluster_size < threshold`` restart at random vectors of z (N, D) (count 1, sum = the
    vector). Returns the new (cluster_size, embed_sum, codebook) and the number of codes restarted."""
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    dead = cluster_size < threshold
    pick = jax.random.randint(rng, (cluster_size.shape[0],), 0, z.shape[0])
    fresh = z[pick]
    codebook = jnp.where(dead[:, None], fresh, codebook)
    embed_sum = jnp.where(dead[:, None], fresh, embed_sum)
    cluster_size = jnp.where(dead, 1.0, cluster_size)
    return cluster_size, embed_sum, codebook, jnp.sum(dead)
