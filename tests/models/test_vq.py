"""Vector quantisation against brute force and closed forms: nearest codes, the straight-through gradient,
EMA codebook statistics, dead-code restarts, codebook usage; and the VQ-VAE export round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.models import vq
from ladic_jax.models import vqvae


def test_nearest_codes_match_brute_force():
    rng = np.random.default_rng(0)
    z, book = rng.normal(size=(5, 7, 6)).astype(np.float32), rng.normal(size=(33, 6)).astype(np.float32)
    d = np.sum((z[..., None, :].astype(np.float64) - book.astype(np.float64)) ** 2, -1)
    np.testing.assert_array_equal(np.asarray(vq.nearest_codes(jnp.asarray(z), jnp.asarray(book))), d.argmin(-1))
    np.testing.assert_allclose(np.asarray(vq.squared_distances(jnp.asarray(z), jnp.asarray(book))), d, rtol=1e-4,
                               atol=1e-4)


def test_straight_through_forward_is_codes_and_gradient_is_identity():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    z_q = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    f = lambda x: jnp.sum(jnp.sin(x) * w)  # noqa: E731
    np.testing.assert_allclose(vq.straight_through(z, z_q), z_q, atol=1e-6)
    g = jax.grad(lambda x: f(vq.straight_through(x, z_q)))(z)
    # d/dz f(z_q) taken as if z_q were z: f'(z_q) = cos(z_q) * w, passed unchanged to z
    np.testing.assert_allclose(g, np.cos(np.asarray(z_q)) * np.asarray(w), rtol=1e-5, atol=1e-6)


def test_ema_update_matches_closed_form_and_converges_to_cluster_means():
    k, decay, eps = 3, 0.9, 1e-5
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    size = np.ones(k)
    embed_sum = np.array([[1.0, 1.0], [4.0, 4.0], [-4.0, 4.0]])
    z = (centres[rng.integers(0, k, 64)] + 0.1 * rng.normal(size=(64, 2))).astype(np.float32)
    codes = np.asarray(vq.nearest_codes(jnp.asarray(z), jnp.asarray(embed_sum, jnp.float32)))
    cs, es, book = vq.ema_update(jnp.asarray(size, jnp.float32), jnp.asarray(embed_sum, jnp.float32),
                                 jnp.asarray(z), jnp.asarray(codes), decay, eps)
    n = np.bincount(codes, minlength=k)
    sums = np.stack([z[codes == i].sum(0) for i in range(k)])
    want_cs = decay * size + (1 - decay) * n
    want_es = decay * embed_sum + (1 - decay) * sums
    smoothed = (want_cs + eps) / (want_cs.sum() + k * eps) * want_cs.sum()
    np.testing.assert_allclose(cs, want_cs, rtol=1e-5)
    np.testing.assert_allclose(es, want_es, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(book, want_es / smoothed[:, None], rtol=1e-5, atol=1e-5)
    for _ in range(200):  # repeated updates on the same data: each code moves to its cluster's mean
        codes = vq.nearest_codes(jnp.asarray(z), book)
        cs, es, book = vq.ema_update(cs, es, jnp.asarray(z), codes, decay, eps)
    means = np.stack([z[np.asarray(codes) == i].mean(0) for i in range(k)])
    np.testing.assert_allclose(book, means, atol=1e-3)


def test_dead_codes_restart_at_batch_vectors():
    size = jnp.asarray([5.0, 0.01, 2.0, 0.0])
    book = jnp.zeros((4, 2))
    z = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cs, es, nb, n = vq.restart_dead(size, book, book, z, jax.random.key(0), threshold=0.1)
    assert int(n) == 2
    np.testing.assert_allclose(cs, [5.0, 1.0, 2.0, 1.0])
    for i in (1, 3):  # restarted codes sit on a batch vector, with that vector as their sum
        assert any(np.allclose(nb[i], v) for v in np.asarray(z))
        np.testing.assert_allclose(es[i], nb[i])
    np.testing.assert_allclose(nb[0], 0.0)
    np.testing.assert_allclose(nb[2], 0.0)


def test_codebook_usage():
    u = vq.codebook_usage(jnp.asarray([[0, 0, 1, 1]]), 4)
    assert float(u["used"]) == pytest.approx(0.5)
    assert float(u["perplexity"]) == pytest.approx(2.0, rel=1e-5)  # two codes, evenly: exp(ln 2)
    assert float(vq.codebook_usage(jnp.arange(8), 8)["perplexity"]) == pytest.approx(8.0, rel=1e-5)


def test_vqvae_export_round_trip(tmp_path):
    cfg = vqvae.VQVAEConfig(channels=(8, 8), num_res_blocks=1, embed_dim=4, num_codes=16)
    model = vqvae.VQVAE(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = model.init(jax.random.key(1), x)["params"]
    vqvae.save_vqvae(str(tmp_path), cfg, params, image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    cfg2, params2, pre = vqvae.load_vqvae(str(tmp_path))
    assert cfg2 == cfg and pre["image_size"] == 16
    a = model.apply({"params": params}, x, method=vqvae.VQVAE.codes)
    b = model.apply({"params": jax.tree.map(jnp.asarray, params2)}, x, method=vqvae.VQVAE.codes)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 4, 4)


def test_vqvae_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="vqvae.json"):
        vqvae.load_vqvae(str(tmp_path))
