"""Gaussian diffusion against closed forms written out here, independently of the module."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.diffusion.gaussian import SCHEDULES, GaussianDiffusion, alphas_cumprod

# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("T", [1, 10, 100, 1000])
def test_alphas_cumprod_monotone_in_unit_interval(schedule, T):
    a = alphas_cumprod(schedule, T)
    assert a.shape == (T,) and a.dtype == np.float64
    assert np.all(a > 0) and np.all(a <= 1)
    assert np.all(np.diff(a) < 0)


def test_linear_matches_ddpm():
    expected = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(alphas_cumprod("linear", 1000), expected, rtol=1e-12)
    # Fewer steps: betas scaled by 1000 / T, so T = 100 uses linspace(1e-3, 0.2, 100).
    expected_100 = np.cumprod(1.0 - np.linspace(1e-3, 0.2, 100))
    np.testing.assert_allclose(alphas_cumprod("linear", 100), expected_100, rtol=1e-12)


def test_cosine_matches_nichol_dhariwal():
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    a = alphas_cumprod("cosine", T)
    expected = np.array([f((t + 1) / T) / f(0.0) for t in range(T - 1)])
    np.testing.assert_allclose(a[:-1], expected, rtol=1e-9)
    # Last beta would be 1 (f(1) = 0): clipped to 0.999.
    np.testing.assert_allclose(a[-1], a[-2] * 0.001, rtol=1e-9)


def test_sqrt_spot_values():
    T = 1000
    a = alphas_cumprod("sqrt", T)
    # alpha_bar(u) = 1 - sqrt(u + 1e-4), normalised by alpha_bar(0) = 0.99; index t uses u = (t+1)/T.
    for t in (0, 1, 10, 499, 998):
        assert a[t] == pytest.approx((1 - math.sqrt((t + 1) / T + 1e-4)) / 0.99, rel=1e-9)
    assert a[0] == pytest.approx(0.97660, abs=1e-5)
    assert a[-1] == pytest.approx(a[-2] * 0.001, rel=1e-9)  # clipped last beta


def test_trunc_lin_spot_values():
    T = 1000
    a = alphas_cumprod("trunc_lin", T)
    assert a[0] == pytest.approx(1 - 0.0101, rel=1e-12)
    # beta_j = 0.0101 + j * (0.03 - 0.0101) / 999
    prod = 1.0
    for j in range(11):
        prod *= 1 - (0.0101 + j * 0.0199 / 999)
    assert a[10] == pytest.approx(prod, rel=1e-10)
    # T = 500: s = 2, betas from 0.0102 to 0.05.
    a500 = alphas_cumprod("trunc_lin", 500)
    assert a500[0] == pytest.approx(1 - 0.0102, rel=1e-12)
    assert a500[1] == pytest.approx((1 - 0.0102) * (1 - (0.0102 + 0.0398 / 499)), rel=1e-12)


def test_trunc_cos_spot_values():
    T = 1000
    a = alphas_cumprod("trunc_cos", T)
    g = lambda u: math.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2
    assert a[0] == pytest.approx(0.979746, abs=1e-6)  # cos^2(pi/22): the first step is already noisy
    for t in (0, 1, 250, 500, 999):
        assert a[t] == pytest.approx(g(t / T), rel=1e-9)


def test_official_schedule():
    a = alphas_cumprod("official", 1000)
    assert a[0] == 1.0
    assert a[1] == pytest.approx(1 - 1e-4, rel=1e-12)
    expected = np.cumprod(1 - np.concatenate([[0.0], np.linspace(1e-4, 0.02, 1000)]))[:1000]
    np.testing.assert_allclose(a, expected, rtol=1e-12)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"'laplace'.*linear, cosine, sqrt, trunc_lin, trunc_cos, official"):
        alphas_cumprod("laplace", 1000)
    with pytest.raises(ValueError, match="num_timesteps"):
        alphas_cumprod("linear", 0)
    with pytest.raises(ValueError, match="noise_factor"):
        GaussianDiffusion.create("linear", 1000, noise_factor=0.0)


# ---------------------------------------------------------------------------------------------- forward


def test_q_sample_closed_form_and_broadcast():
    diff = GaussianDiffusion.create("cosine", 1000, noise_factor=4.0)
    abar = alphas_cumprod("cosine", 1000)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 5, 7)).astype(np.float32)
    eps = rng.normal(size=(3, 5, 7)).astype(np.float32)
    t = np.array([0, 400, 999])
    out = np.asarray(diff.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps)))
    for b in range(3):
        expected = math.sqrt(abar[t[b]]) * x0[b] + 4.0 * math.sqrt(1 - abar[t[b]]) * eps[b]
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-5)
    # An explicit factor overrides the training default.
    out1 = np.asarray(diff.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps), factor=1.0))
    np.testing.assert_allclose(out1[1], math.sqrt(abar[400]) * x0[1] + math.sqrt(1 - abar[400]) * eps[1], atol=1e-5)
    # t < 0 is the clean data.
    np.testing.assert_array_equal(np.asarray(diff.q_sample(jnp.asarray(x0), jnp.full((3,), -1), jnp.asarray(eps))), x0)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_q_sample_statistics(factor):
    """Mean within 5 standard errors; variance within 2% (standard error of the variance is ~0.3%)."""
    diff = GaussianDiffusion.create("linear", 1000)
    abar = alphas_cumprod("linear", 1000)
    n = 200_000
    t = np.array([10, 300, 700, 999])
    x0 = jnp.broadcast_to(jnp.array([1.5, -0.7, 2.0, 0.3])[:, None], (4, n))
    noise = jax.random.normal(jax.random.key(1), (4, n))
    xt = np.asarray(diff.q_sample(x0, jnp.asarray(t), noise, factor=factor), dtype=np.float64)
    for b in range(4):
        mean, var = math.sqrt(abar[t[b]]) * float(x0[b, 0]), factor**2 * (1 - abar[t[b]])
        assert abs(xt[b].mean() - mean) < 5 * math.sqrt(var / n)
        assert xt[b].var() == pytest.approx(var, rel=0.02)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_input_scale_gives_unit_variance(factor):
    """x0 and ε independent with unit variance: input_scale(t) * x_t has variance 1 at every t (to 2%)."""
    diff = GaussianDiffusion.create("cosine", 1000, noise_factor=factor)
    n = 200_000
    t = jnp.array([0, 250, 500, 750, 999])
    k0, k1 = jax.random.split(jax.random.key(3))
    x0 = jax.random.normal(k0, (5, n))
    xt = diff.q_sample(x0, t, jax.random.normal(k1, (5, n)))
    scaled = np.asarray(xt * diff.input_scale(t)[:, None], np.float64)
    np.testing.assert_allclose(scaled.var(axis=1), 1.0, rtol=0.02)
    # The factor argument overrides the training factor; clean data (t < 0) is left as it is.
    abar = alphas_cumprod("cosine", 1000)[500]
    assert float(diff.input_scale(jnp.int32(500), 2.0)) == pytest.approx(1 / math.sqrt(abar + 4 * (1 - abar)), rel=1e-5)
    assert float(diff.input_scale(jnp.int32(-1))) == pytest.approx(1.0)


def test_q_sample_shape_errors():
    diff = GaussianDiffusion.create("linear", 100)
    x0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
        diff.q_sample(x0, jnp.array([1, 2, 3]), x0)
    with pytest.raises(ValueError, match="noise shape"):
        diff.q_sample(x0, jnp.array([1, 2]), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="integers"):
        diff.q_sample(x0, jnp.array([1.0, 2.0]), x0)


# ---------------------------------------------------------------------------------------------- reverse


@pytest.mark.parametrize("schedule,factor", [("cosine", 1.0), ("linear", 1.0), ("official", 4.0)])
def test_ddim_eta0_with_true_x0_follows_the_deterministic_path(schedule, factor):
    """x_t = q(x0, t, ε) -> DDIM(η=0, x̂0 = x0) -> sqrt(ᾱ_prev) x0 + k sqrt(1-ᾱ_prev) ε; float32, atol 2e-5."""
    diff = GaussianDiffusion.create(schedule, 1000, sample_noise_factor=factor)
    abar = alphas_cumprod(schedule, 1000)
    rng = np.random.default_rng(2)
    x0 = rng.normal(size=(4, 6, 8)).astype(np.float32)
    eps = rng.normal(size=(4, 6, 8)).astype(np.float32)
    t = np.array([999, 500, 100, 40])
    t_prev = np.array([966, 300, 99, 7])
    xt = diff.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps), factor=factor)
    out = np.asarray(diff.ddim_step(xt, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(t_prev), 0.0, jax.random.key(0)))
    for b in range(4):
        expected = math.sqrt(abar[t_prev[b]]) * x0[b] + factor * math.sqrt(1 - abar[t_prev[b]]) * eps[b]
        np.testing.assert_allclose(out[b], expected, atol=2e-5 * factor)


def test_ddim_final_step_returns_x0_hat():
    diff = GaussianDiffusion.create("cosine", 1000)
    xt = jax.random.normal(jax.random.key(0), (3, 4))
    x0_hat = jax.random.normal(jax.random.key(1), (3, 4))
    for eta in (0.0, 1.0):
        out = diff.ddim_step(xt, x0_hat, jnp.array([199, 5, 0]), jnp.array([-1, -1, -1]), eta, jax.random.key(2))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x0_hat))
    # Mixed batch: only the rows with t_prev < 0 are final.
    out = diff.ddim_step(xt, x0_hat, jnp.array([199, 5, 0]), jnp.array([100, -1, -1]), 0.0, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(out[1:]), np.asarray(x0_hat[1:]))
    assert not np.allclose(np.asarray(out[0]), np.asarray(x0_hat[0]))


def test_ddim_eta1_is_the_ddpm_posterior():
    """η = 1, t_prev = t - 1: mean = μ̃_t(x_t, x0), variance = β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) β_t.

    200k samples per row: mean within 5 standard errors, variance within 2%.
    """
    diff = GaussianDiffusion.create("cosine", 1000)
    abar = alphas_cumprod("cosine", 1000)
    n = 200_000
    t = np.array([1, 250, 600, 990])
    x0_val = np.array([0.8, -1.2, 0.4, 2.0])
    xt_val = np.array([0.5, 0.3, -1.0, 1.1])
    x0 = jnp.broadcast_to(jnp.asarray(x0_val, jnp.float32)[:, None], (4, n))
    xt = jnp.broadcast_to(jnp.asarray(xt_val, jnp.float32)[:, None], (4, n))
    out = np.asarray(diff.ddim_step(xt, x0, jnp.asarray(t), jnp.asarray(t - 1), 1.0, jax.random.key(3)), np.float64)
    for b in range(4):
        a_t, a_p = abar[t[b]], abar[t[b] - 1]
        beta = 1 - a_t / a_p
        post_var = (1 - a_p) / (1 - a_t) * beta
        post_mean = math.sqrt(a_p) * beta / (1 - a_t) * x0_val[b] + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * xt_val[b]
        assert abs(out[b].mean() - post_mean) < 5 * math.sqrt(post_var / n) + 1e-6
        assert out[b].var() == pytest.approx(post_var, rel=0.02)


def test_ddim_eta_variance_over_a_skip():
    """Over a skip (t -> t_prev) the added variance is η² (1-ᾱ_prev)/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_prev) (DDIM eq. 16)."""
    diff = GaussianDiffusion.create("linear", 1000)
    abar = alphas_cumprod("linear", 1000)
    n, eta = 200_000, 0.5
    x = jnp.ones((1, n))
    out = np.asarray(diff.ddim_step(x, x, jnp.array([800]), jnp.array([500]), eta, jax.random.key(4)), np.float64)
    a_t, a_p = abar[800], abar[500]
    sigma2 = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert out.var() == pytest.approx(sigma2, rel=0.02)


def test_renoise_step_statistics_and_final():
    diff = GaussianDiffusion.create("official", 1000, noise_factor=4.0, sample_noise_factor=1.0)
    abar = alphas_cumprod("official", 1000)
    n = 200_000
    x0 = jnp.full((2, n), 1.3)
    out = np.asarray(diff.renoise_step(x0, jnp.array([966, 33]), jax.random.key(5)), np.float64)
    for b, tp in enumerate((966, 33)):
        var = 1.0 * (1 - abar[tp])  # re-noising uses the sampling factor (1), not the training factor (4)
        assert abs(out[b].mean() - math.sqrt(abar[tp]) * 1.3) < 5 * math.sqrt(var / n)
        assert out[b].var() == pytest.approx(var, rel=0.02)
    final = diff.renoise_step(x0[:, :5], jnp.array([-1, -1]), jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(final), np.asarray(x0[:, :5]))


def test_snr():
    diff = GaussianDiffusion.create("official", 1000)
    abar = alphas_cumprod("official", 1000)
    s = np.asarray(diff.snr(jnp.array([0, 1, 500, 999])))
    assert np.isinf(s[0])
    np.testing.assert_allclose(s[1:], abar[[1, 500, 999]] / (1 - abar[[1, 500, 999]]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- timesteps


def test_sampling_timesteps():
    diff = GaussianDiffusion.create("linear", 1000)
    np.testing.assert_array_equal(diff.sampling_timesteps(1), [999])
    np.testing.assert_array_equal(diff.sampling_timesteps(5), [999, 799, 599, 399, 199])
    ts30 = diff.sampling_timesteps(30)
    assert len(ts30) == 30 and ts30[0] == 999 and ts30[-1] == 42
    assert set(np.diff(ts30)) == {-33}
    np.testing.assert_array_equal(diff.sampling_timesteps(1000), np.arange(999, -1, -1))
    for n in (1, 3, 7, 30, 333, 999, 1000):
        ts = diff.sampling_timesteps(n)
        assert len(ts) == n and ts[0] == 999 and np.all(ts >= 0)
        assert len(set(np.diff(ts))) <= 1
        assert ts[-1] == 1000 // n - 1 + 1000 % n
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            diff.sampling_timesteps(bad)


def test_ddim_loop_in_scan_under_jit_recovers_x0():
    """A 7-step DDIM loop in lax.scan with traced t and an oracle x̂0 ends exactly at x0 and, step by step,
    matches the un-jitted steps."""
    diff = GaussianDiffusion.create("cosine", 1000)
    ts = diff.sampling_timesteps(7)
    prev = np.concatenate([ts[1:], [-1]])
    x0 = jax.random.normal(jax.random.key(7), (2, 24, 16))
    x_T = jax.random.normal(jax.random.key(8), (2, 24, 16))

    @jax.jit
    def run(d, x_T, x0):
        def body(x, tt):
            t, tp = tt
            tb = jnp.full((x.shape[0],), t)
            x = d.ddim_step(x, x0, tb, jnp.full((x.shape[0],), tp), 0.0, jax.random.key(0))
            return x, x

        return jax.lax.scan(body, x_T, (jnp.asarray(ts), jnp.asarray(prev)))

    final, path = run(diff, x_T, x0)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(x0))
    x = x_T
    for i, (t, tp) in enumerate(zip(ts, prev)):
        x = diff.ddim_step(x, x0, jnp.full((2,), t), jnp.full((2,), tp), 0.0, jax.random.key(0))
        np.testing.assert_allclose(np.asarray(path[i]), np.asarray(x), atol=1e-5)
