"""Discrete diffusion against dense float64 transition matrices built here from the per-step definitions.

The references never use the module's closed forms: per-step (α_t, β_t, γ_t) come straight from the
schedule's definition, the (K+1) × (K+1) matrices Q_t are multiplied out, and posteriors use Bayes' rule.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.diffusion import discrete
from ladic_jax.diffusion.discrete import (
    guided_log_probs,
    make_schedule,
    sample_categorical,
    sample_timesteps,
    update_loss_history,
)

# Jitted once per shape: much faster than op-by-op dispatch (and exercises the functions under jit).
log_posterior = jax.jit(discrete.log_posterior)
log_q_xt_given_x0 = jax.jit(discrete.log_q_xt_given_x0)
losses = jax.jit(discrete.losses)


@jax.jit
def losses_and_grad(sched, logits, x0, x_t, t, weights):
    """`losses` and the gradient of the summed vlb with respect to the logits."""
    def total_vlb(lg):
        out = discrete.losses(sched, lg, x0, x_t, t, weights)
        return jnp.sum(out["vlb"]), out

    (_, out), grad = jax.value_and_grad(total_vlb, has_aux=True)(logits)
    return out, grad


q_sample = jax.jit(discrete.q_sample)
denoise_step = jax.jit(discrete.denoise_step)

K, T = 5, 10
# Default VQ-Diffusion schedule (replacement ~1e-6), one with a large replacement part, and absorbing.
CONFIGS = {
    "vq_default": ("mask_replace", {}),
    "replace": ("mask_replace", dict(att_1=0.9, att_T=0.1, ctt_1=0.05, ctt_T=0.5)),
    "absorbing": ("absorbing", {}),
}

# ---------------------------------------------------------------------------------------------- references


def ref_steps(kind, num_classes, num_timesteps, att_1=0.99999, att_T=0.000009, ctt_1=0.000009, ctt_T=0.99999):
    """Per-step (α_t, β_t, γ_t), float64 (T,) each, from the definitions: α_t = ᾱ_t / ᾱ_{t-1},
    γ_t = 1 - (1 - γ̄_t) / (1 - γ̄_{t-1}), β_t = (1 - α_t - γ_t) / K, with ᾱ = 1, γ̄ = 0 before step 0."""
    if kind == "absorbing":
        att = np.linspace(1 - 1 / num_timesteps, 0.0, num_timesteps)
        ctt = 1 - att
    else:
        att = np.linspace(att_1, att_T, num_timesteps)
        ctt = np.linspace(ctt_1, ctt_T, num_timesteps)
    alpha = att / np.concatenate([[1.0], att[:-1]])
    gamma = 1 - (1 - ctt) / (1 - np.concatenate([[0.0], ctt[:-1]]))
    beta = np.zeros(num_timesteps) if kind == "absorbing" else (1 - alpha - gamma) / num_classes
    return alpha, beta, gamma


def step_matrix(num_classes, a, b, c):
    """Q[i, j] = q(x_t = j | x_{t-1} = i) for one mask-and-replace step."""
    q = np.zeros((num_classes + 1, num_classes + 1))
    q[:num_classes, :num_classes] = b + a * np.eye(num_classes)
    q[:num_classes, num_classes] = c
    q[num_classes, num_classes] = 1.0
    return q


class Dense:
    """Dense matrices of one schedule: Q[t] (one step into model timestep t) and cumulative products."""

    def __init__(self, kind, num_classes=K, num_timesteps=T, **kw):
        self.K = num_classes
        self.Q = [step_matrix(num_classes, *abc) for abc in zip(*ref_steps(kind, num_classes, num_timesteps, **kw))]
        self.cum = []
        prod = np.eye(num_classes + 1)
        for q in self.Q:
            prod = prod @ q
            self.cum.append(prod)

    def cumulative(self, t):
        return np.eye(self.K + 1) if t < 0 else self.cum[t]

    def between(self, s, t):
        """q(x_t | x_s) as a matrix: Q[s+1] ... Q[t]."""
        prod = np.eye(self.K + 1)
        for q in self.Q[s + 1 : t + 1]:
            prod = prod @ q
        return prod

    def posterior(self, p_hat, k, t, s):
        """Σ_{x0} p̂(x0) q(x_s | x_t = k, x0) by Bayes' rule, over the x0 with q(x_t = k | x0) > 0; None if
        there is none."""
        cum_s, step, cum_t = self.cumulative(s), self.between(s, t), self.cumulative(t)
        out, norm = np.zeros(self.K + 1), 0.0
        for i in range(self.K):
            if cum_t[i, k] > 0:
                out += p_hat[i] * cum_s[i, :] * step[:, k] / cum_t[i, k]
                norm += p_hat[i]
        return out / norm if norm > 0 else None


def within_binomial(freq, p, n):
    """Every empirical frequency of n draws within 4 binomial standard deviations (+ 1/n) of p."""
    sigma = np.sqrt(np.clip(p * (1 - p), 0.0, None) / n)
    return bool(np.all(np.abs(freq - p) <= 4 * sigma + 1 / n))


def kl(p, q):
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def sched_for(name, num_classes=K, num_timesteps=T):
    kind, kw = CONFIGS[name]
    return make_schedule(num_classes, num_timesteps, kind=kind, **kw)


def dense_for(name):
    kind, kw = CONFIGS[name]
    return Dense(kind, **kw)


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_matches_products_of_step_matrices(name):
    """The stored closed forms (ᾱ, β̄, γ̄ linear / derived) equal the products of the per-step matrices."""
    sched, dense = sched_for(name), dense_for(name)
    kind, kw = CONFIGS[name]
    alpha, beta, gamma = ref_steps(kind, K, T, **kw)
    close = lambda got_log, want: np.testing.assert_allclose(  # noqa: E731
        np.exp(np.asarray(got_log, np.float64)), want, rtol=2e-5, atol=1e-25
    )
    cum = np.stack(dense.cum)
    close(sched.log_abar, cum[:, 0, 0] - cum[:, 0, 1])
    close(sched.log_bbar, cum[:, 0, 1])
    close(sched.log_gbar, cum[:, 0, K])
    close(sched.log_1m_gbar, 1 - cum[:, 0, K])
    close(sched.log_alpha, alpha)
    close(sched.log_beta, beta)
    close(sched.log_gamma, gamma)
    # Rows of Q̄ are distributions with the mask-and-replace structure.
    np.testing.assert_allclose(cum.sum(-1), 1.0, atol=1e-12)
    assert sched.num_timesteps == T and sched.mask_id == K
    for arr in (sched.log_abar, sched.log_bbar, sched.log_gbar, sched.log_beta, sched.log_gamma):
        assert arr.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(arr)))


def test_default_schedule_values():
    sched = make_schedule(K, 100)
    assert float(np.exp(sched.log_abar[0])) == pytest.approx(0.99999, rel=1e-6)
    assert float(np.exp(sched.log_abar[-1])) == pytest.approx(0.000009, rel=1e-5)
    assert float(np.exp(sched.log_gbar[-1])) == pytest.approx(0.99999, rel=1e-6)
    # ᾱ + γ̄ = 0.999999 throughout, so K β̄ = 1e-6.
    np.testing.assert_allclose(np.exp(np.asarray(sched.log_bbar, np.float64)) * K, 1e-6, rtol=1e-4)
    absorbing = make_schedule(K, 4, kind="absorbing")
    np.testing.assert_allclose(np.exp(np.asarray(absorbing.log_abar[:3])), [0.75, 0.5, 0.25], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0, num_timesteps=10), "num_classes"),
        (dict(num_classes=5, num_timesteps=0), "num_timesteps"),
        (dict(num_classes=5, num_timesteps=2.5), "num_timesteps"),
        (dict(num_classes=5, num_timesteps=10, kind="uniform"), "kind"),
        (dict(num_classes=5, num_timesteps=10, att_1=1.5), "att_1"),
        (dict(num_classes=5, num_timesteps=10, att_T=0.0), "att_T"),
        (dict(num_classes=5, num_timesteps=10, att_1=0.5, att_T=0.6), "att_T"),
        (dict(num_classes=5, num_timesteps=10, ctt_T=1.0), "ctt_T"),
        (dict(num_classes=5, num_timesteps=10, ctt_1=-0.1), "ctt_1"),
        (dict(num_classes=5, num_timesteps=10, ctt_1=0.6, ctt_T=0.5), "ctt_1"),
        (dict(num_classes=5, num_timesteps=10, att_1=0.9, ctt_1=0.1), r"att_1 \+ ctt_1"),
        (dict(num_classes=5, num_timesteps=10, att_T=0.3, ctt_T=0.7), r"att_T \+ ctt_T"),
        # β̄ / ᾱ shrinking: β̄ K goes 0.5 -> 0.01 while ᾱ only 0.5 -> 0.49.
        (dict(num_classes=5, num_timesteps=10, att_1=0.5, att_T=0.49, ctt_1=0.0, ctt_T=0.5), "att_1, att_T"),
        (dict(num_classes=5, num_timesteps=10, kind="absorbing", att_T=0.1), "att_T"),
        (dict(num_classes=5, num_timesteps=10, kind="absorbing", ctt_1=0.1), "ctt_1"),
        (dict(num_classes=5, num_timesteps=10, kind="absorbing", att_1=1.2), "att_1"),
    ],
)
def test_invalid_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", CONFIGS)
def test_log_q_xt_given_x0_matches_cumulative_rows(name):
    sched, dense = sched_for(name), dense_for(name)
    ts = np.array([-1, 0, 1, 4, 8, 9])
    # One-hot inputs with -inf zeros over all K + 1 states: rows of Q̄_t.
    onehot = np.where(np.eye(K + 1, dtype=bool), 0.0, -np.inf)
    log_x0 = jnp.asarray(np.broadcast_to(onehot, (len(ts), K + 1, K + 1)), jnp.float32)
    got = np.exp(np.asarray(log_q_xt_given_x0(sched, log_x0, jnp.asarray(ts)), np.float64))
    for b, t in enumerate(ts):
        np.testing.assert_allclose(got[b], dense.cumulative(t), atol=1e-5)
    # Distributions over the K classes: p Q̄_t (with p([MASK]) = 0).
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(K), size=(len(ts), 3))
    got = np.exp(np.asarray(log_q_xt_given_x0(sched, jnp.asarray(np.log(p), jnp.float32), jnp.asarray(ts))))
    for b, t in enumerate(ts):
        want = np.concatenate([p[b], np.zeros((3, 1))], axis=-1) @ dense.cumulative(t)
        np.testing.assert_allclose(got[b], want, atol=1e-5)
        np.testing.assert_allclose(got[b].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_q_sample_frequencies(name):
    """20k draws per row; every state's frequency within 4 binomial standard deviations (+ 1/n) of q."""
    sched, dense = sched_for(name), dense_for(name)
    n = 20_000
    x0_vals = np.array([0, 3, 4, 2, 1, K])  # the last row starts from [MASK]
    ts = np.array([0, 2, 5, 8, 9, 4])
    x0 = jnp.asarray(np.repeat(x0_vals[:, None], n, axis=1))
    xt = np.asarray(q_sample(sched, x0, jnp.asarray(ts), jax.random.key(0)))
    assert xt.dtype == np.int32 and xt.shape == (len(ts), n)
    for b in range(len(ts)):
        p = dense.cumulative(ts[b])[x0_vals[b]]
        freq = np.bincount(xt[b], minlength=K + 1) / n
        assert within_binomial(freq, p, n), (b, freq, p)
    # t = -1 is the clean data.
    same = q_sample(sched, x0[:, :50], jnp.full((len(ts),), -1), jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x0[:, :50]))


def test_absorbing_last_step_is_all_mask():
    sched = make_schedule(K, T, kind="absorbing")
    x0 = jax.random.randint(jax.random.key(0), (6, 20_000), 0, K)  # the shapes of test_q_sample_frequencies
    xt = np.asarray(q_sample(sched, x0, jnp.full((6,), T - 1), jax.random.key(1)))
    assert np.all(xt == K)
    q = np.exp(np.asarray(log_q_xt_given_x0(sched, discrete.log_onehot(x0[:, :7], K), jnp.full((6,), T - 1))))
    assert np.all(q[..., K] == 1.0)
    assert np.all(q[..., :K] <= 1e-29)
    # Earlier steps never replace: x_t is x0 or [MASK].
    xt = np.asarray(q_sample(sched, x0, jnp.array([0, 2, 3, 5, 6, 8]), jax.random.key(2)))
    assert np.all((xt == np.asarray(x0)) | (xt == K))


# ---------------------------------------------------------------------------------------------- posterior


POSTERIOR_STEPS = [(9, 8), (9, 5), (9, 0), (5, 4), (5, 1), (1, 0), (3, -1), (0, -1), (9, -1)]


@pytest.mark.parametrize("name", CONFIGS)
def test_log_posterior_matches_bayes_rule(name):
    """Every x_t in 0..K, one-step and skipping steps, random p̂: probabilities within 1e-5, rows sum to 1."""
    sched, dense = sched_for(name), dense_for(name)
    ts = np.array([t for t, _ in POSTERIOR_STEPS])
    ss = np.array([s for _, s in POSTERIOR_STEPS])
    B, L = len(ts), K + 1
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, L, K)) * 2.0
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    x_t = np.broadcast_to(np.arange(L), (B, L))
    got_log = np.asarray(
        log_posterior(sched, jnp.asarray(log_p, jnp.float32), jnp.asarray(x_t), jnp.asarray(ts), jnp.asarray(ss))
    )
    assert got_log.shape == (B, L, K + 1) and np.all(np.isfinite(got_log))
    got = np.exp(got_log.astype(np.float64))
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    checked = 0
    for b in range(B):
        for k in range(L):
            want = dense.posterior(np.exp(log_p[b, k]), k, ts[b], ss[b])
            if want is None:  # x_t = k is impossible
                continue
            np.testing.assert_allclose(got[b, k], want, atol=1e-5, err_msg=f"t={ts[b]} s={ss[b]} x_t={k}")
            checked += 1
    impossible = K * int(np.sum(ts == T - 1)) if name == "absorbing" else 0  # unmasked at the last step
    assert checked == B * L - impossible


def test_log_posterior_one_step_is_consistent_with_per_step_matrix():
    """With p̂ = one-hot(x0), the one-step posterior equals q(x_{t-1} | x0) q(x_t | x_{t-1}) / q(x_t | x0)
    using the schedule's own per-step logs (ties the skipping formula with s = t-1 to the stored steps)."""
    sched = sched_for("replace")
    t, x0, k = 6, 2, 2
    la, lb, lc = (float(np.exp(a[t])) for a in (sched.log_alpha, sched.log_beta, sched.log_gamma))
    step = step_matrix(K, la, lb, lc)
    cum_prev = np.exp(np.asarray(log_q_xt_given_x0(sched, discrete.log_onehot(jnp.array([[x0]]), K), jnp.array([t - 1]))))[0, 0]
    want = cum_prev * step[:, k]
    want /= want.sum()
    got = np.exp(np.asarray(log_posterior(sched, discrete.log_onehot(jnp.array([[x0]]), K), jnp.array([[k]]), jnp.array([t]), jnp.array([t - 1]))))[0, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_denoise_step(name):
    """x_s draws follow the dense posterior (20k draws, 4 binomial sigmas + 1/n); the final step (s = -1) is
    the argmax of p̂, except that the absorbing kind keeps unmasked tokens."""
    sched, dense = sched_for(name), dense_for(name)
    n = 20_000
    logits = np.array([1.0, -0.5, 0.3, 2.0, -1.0])
    p = np.exp(logits) / np.exp(logits).sum()
    log_x0_hat = jnp.broadcast_to(jnp.asarray(np.log(p), jnp.float32), (2, n, K))
    x_t = jnp.full((2, n), K).at[1].set(2)
    t, s = jnp.array([7, 7]), jnp.array([3, 6])
    draws = np.asarray(denoise_step(sched, log_x0_hat, x_t, t, s, jax.random.key(0)))
    for b, k in enumerate((K, 2)):
        probs = dense.posterior(p, k, int(t[b]), int(s[b]))
        freq = np.bincount(draws[b], minlength=K + 1) / n
        assert within_binomial(freq, probs, n), (freq, probs)
    final = np.asarray(denoise_step(sched, log_x0_hat, x_t, t, jnp.array([-1, -1]), jax.random.key(1)))
    assert np.all(final[0] == 3)
    assert np.all(final[1] == (2 if name == "absorbing" else 3))


# ---------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", CONFIGS)
def test_losses_zero_for_perfect_prediction_and_match_dense_kl(name):
    sched, dense = sched_for(name), dense_for(name)
    B, L = 6, 12
    t = jnp.array([0, 1, 3, 5, 8, 9])
    # Drawn at the shapes of test_q_sample_frequencies (no extra compilation), then cut to L positions.
    x0 = jax.random.randint(jax.random.key(0), (B, 20_000), 0, K)
    x_t = q_sample(sched, x0, t, jax.random.key(1))[:, :L]
    x0 = x0[:, :L]
    weights = (jnp.arange(L) < jnp.array([12, 10, 12, 7, 12, 3])[:, None]).astype(jnp.float32)
    perfect, _ = losses_and_grad(sched, jax.nn.one_hot(x0, K) * 1e4, x0, x_t, t, weights)
    assert perfect["vlb"].shape == (B,) and perfect["x0_ce"].shape == (B,)
    assert np.all(np.abs(np.asarray(perfect["vlb"])) <= 1e-6)
    assert np.all(np.asarray(perfect["x0_ce"]) <= 1e-6)

    logits = jax.random.normal(jax.random.key(2), (B, L, K)) * 1.5
    out, grad = losses_and_grad(sched, logits, x0, x_t, t, weights)
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
    p_hat = np.asarray(jax.nn.softmax(logits), np.float64)
    x0_np, xt_np, w = np.asarray(x0), np.asarray(x_t), np.asarray(weights)
    for b in range(B):
        tb = int(t[b])
        per_pos, ce = [], []
        for pos in range(L):
            ce.append(-math.log(p_hat[b, pos, x0_np[b, pos]]))
            if tb == 0:
                per_pos.append(ce[-1])
            else:
                true = dense.posterior(np.eye(K)[x0_np[b, pos]], xt_np[b, pos], tb, tb - 1)
                model = dense.posterior(p_hat[b, pos], xt_np[b, pos], tb, tb - 1)
                per_pos.append(kl(true, model))
        want_vlb = np.sum(np.array(per_pos) * w[b]) / w[b].sum()
        want_ce = np.sum(np.array(ce) * w[b]) / w[b].sum()
        assert float(out["vlb"][b]) == pytest.approx(want_vlb, rel=1e-3, abs=1e-6)
        assert float(out["x0_ce"][b]) == pytest.approx(want_ce, rel=1e-5)
        if tb >= 1 and name != "absorbing":
            assert float(out["vlb"][b]) > 1e-4


# ---------------------------------------------------------------------------------------------- timesteps


def test_sample_timesteps_uniform_until_min_count():
    n, Tn = 100_000, 8
    history = jnp.arange(1.0, Tn + 1.0)
    counts = jnp.full((Tn,), 20.0).at[3].set(9.0)  # one timestep below min_count = 10
    for hist, cnt in ((None, None), (history, counts)):
        t, pt = sample_timesteps(jax.random.key(0), n, Tn, hist, cnt, min_count=10)
        assert t.dtype == jnp.int32 and t.shape == (n,)
        np.testing.assert_allclose(np.asarray(pt), 1 / Tn)
        freq = np.bincount(np.asarray(t), minlength=Tn) / n
        assert within_binomial(freq, np.full(Tn, 1 / Tn), n)


def test_sample_timesteps_importance():
    """Once every count reaches min_count: frequencies within 4 binomial sigmas of sqrt(history) normalised."""
    n, Tn = 100_000, 8
    history = jnp.array([0.0, 1.0, 4.0, 9.0, 16.0, 0.25, 2.0, 100.0])
    counts = jnp.full((Tn,), 10.0)
    t, pt = jax.jit(sample_timesteps, static_argnums=(1, 2))(jax.random.key(1), n, Tn, history, counts)
    root = np.sqrt(np.asarray(history, np.float64) + 1e-10)
    want = root / root.sum()
    np.testing.assert_allclose(np.asarray(pt), want[np.asarray(t)], rtol=1e-5)
    freq = np.bincount(np.asarray(t), minlength=Tn) / n
    assert within_binomial(freq, want, n)


def test_update_loss_history_uses_batch_mean_of_squares():
    history = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    counts = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    t = jnp.array([2, 2, 5, 2])
    loss = jnp.array([1.0, 2.0, 3.0, 4.0])
    update = jax.jit(update_loss_history)
    new_h, new_c = update(history, counts, t, loss)
    want_h = np.array([1.0, 2.0, 0.9 * 3 + 0.1 * (1 + 4 + 16) / 3, 4.0, 5.0, 0.9 * 6 + 0.1 * 9])
    np.testing.assert_allclose(np.asarray(new_h), want_h, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_c), [0.0, 1.0, 5.0, 3.0, 4.0, 6.0])
    assert new_h.dtype == jnp.float32 and new_c.dtype == jnp.float32
    # Order within the batch does not matter.
    perm = jnp.array([3, 0, 2, 1])
    h2, c2 = update(history, counts, t[perm], loss[perm])
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(new_h))


# ---------------------------------------------------------------------------------------------- sampling


def test_guided_log_probs():
    rng = np.random.default_rng(3)
    cond = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32))
    weak = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32))
    np.testing.assert_allclose(np.asarray(guided_log_probs(cond, weak, 1.0)), np.asarray(cond), atol=1e-6)
    np.testing.assert_allclose(np.asarray(guided_log_probs(cond, weak, 0.0)), np.asarray(weak), atol=1e-6)
    c, w = np.asarray(cond, np.float64), np.asarray(weak, np.float64)
    z = w + 3.0 * (c - w)
    want = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(guided_log_probs(cond, weak, 3.0)), want, atol=1e-5)
    # -inf entries do not give NaN.
    assert np.all(np.isfinite(np.asarray(guided_log_probs(cond.at[0, 0, 0].set(-jnp.inf), weak, 2.0))))


def test_sample_categorical_frequencies():
    n = 50_000
    p = np.array([0.1, 0.0, 0.6, 0.3])
    log_p = jnp.asarray(np.log(np.maximum(p, 1e-30)), jnp.float32)
    draws = np.asarray(sample_categorical(jax.random.key(4), jnp.broadcast_to(log_p, (n, 4))))
    assert draws.dtype == np.int32
    freq = np.bincount(draws, minlength=4) / n
    assert within_binomial(freq, p, n)


# ---------------------------------------------------------------------------------------------- scaling


def _avals(jaxpr):
    """Every variable's aval in a jaxpr, its equations and all sub-jaxprs (pjit, cond, custom_jvp, ...)."""
    yield from (v.aval for v in list(jaxpr.invars) + list(jaxpr.constvars))
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        stack = list(eqn.params.values())
        while stack:
            p = stack.pop()
            if isinstance(p, (list, tuple)):
                stack.extend(p)
            elif hasattr(p, "eqns"):
                yield from _avals(p)
            elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                yield from _avals(p.jaxpr)


@pytest.mark.parametrize("kind", discrete.KINDS)
def test_no_quadratic_arrays_for_a_bert_vocabulary(kind):
    """K = 30522: no intermediate in log_posterior, losses or its gradient has two axes of size >= K."""
    V, B, L = 30522, 2, 8
    sched = make_schedule(V, 100, kind=kind)
    logits = jax.random.normal(jax.random.key(0), (B, L, V))
    x0 = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    t = jnp.array([50, 0])
    x_t = q_sample(sched, x0, t, jax.random.key(2))
    log_p = jax.nn.log_softmax(logits)

    def loss_and_grad(sched, logits, x0, x_t, t):
        return jax.value_and_grad(lambda lg: jnp.sum(discrete.losses(sched, lg, x0, x_t, t)["vlb"]))(logits)

    traced = [
        jax.make_jaxpr(discrete.log_posterior)(sched, log_p, x_t, t, t - 3),
        jax.make_jaxpr(discrete.losses)(sched, logits, x0, x_t, t),
        jax.make_jaxpr(loss_and_grad)(sched, logits, x0, x_t, t),
    ]
    for closed in traced:
        shapes = [getattr(a, "shape", ()) for a in _avals(closed.jaxpr)]
        assert len(shapes) > 10
        assert all(sum(d >= V for d in shape) <= 1 for shape in shapes), [s for s in shapes if len(s) >= 2]
    if kind == "mask_replace":
        out = losses(sched, logits, x0, x_t, t)
        assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())


def test_truncation_keeps_the_top_mass_and_renormalises():
    p = np.array([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    # r = 0.6: 0.5 is below it, 0.3 crosses it -> {0, 2} kept; second row: the argmax alone crosses it.
    got = np.exp(np.asarray(discrete.truncate_log_probs(jnp.log(jnp.asarray(p, jnp.float32)), 0.6)))
    np.testing.assert_allclose(got[0], [0.5 / 0.8, 0.0, 0.3 / 0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(got[1], [1.0, 0.0, 0.0, 0.0], atol=1e-6)
    same = discrete.truncate_log_probs(jnp.log(jnp.asarray(p, jnp.float32)), 1.0)
    np.testing.assert_allclose(np.exp(np.asarray(same)), p, rtol=1e-6)
    tiny = np.exp(np.asarray(discrete.truncate_log_probs(jnp.log(jnp.asarray(p, jnp.float32)), 1e-3)))
    np.testing.assert_allclose(tiny.argmax(-1), p.argmax(-1))
    np.testing.assert_allclose(tiny.max(-1), 1.0, atol=1e-6)  # r -> 0: the argmax alone
