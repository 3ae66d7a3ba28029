"""Discrete (token) diffusion: mask-and-replace / absorbing transitions, computed per token in log space.

Family-agnostic: nothing here knows what the tokens are (word pieces, VQ codes, ...).

States and timesteps
--------------------
Every token is in one of K + 1 states: the K classes ``0 .. K-1`` and [MASK] = ``K``. Model timesteps are
integers ``t = 0 .. T-1``; model timestep ``t`` denotes the state after ``t + 1`` forward steps (x_{t+1} in the
1-based D3PM notation), so ``t = 0`` carries one step of noise and ``t = T-1`` is the noisiest. The clean data
x_0 has model index ``-1``: a reverse step whose target ``s`` is negative therefore means "finish" and
returns the x0-prediction. Below, x_t always uses the model index, and ᾱ_t, β̄_t, γ̄_t are the cumulative
coefficients of q(x_t | x_{-1} = x_0); at ``t = -1`` they are (1, 0, 0).

Transition matrices (rows = from, columns = to)
-----------------------------------------------
A mask-and-replace transition with coefficients (α, β, γ), α + Kβ + γ = 1, sends a class i to
  - i itself with probability α + β,
  - each other class j with probability β (the "replace" part: uniform over all K classes),
  - [MASK] with probability γ,
and leaves [MASK] as it is. Products of such matrices have the same form: (α, β, γ)·(α', β', γ') gives
α'' = αα', 1 - γ'' = (1 - γ)(1 - γ'), β'' = (1 - α'' - γ'') / K. Hence q(x_t | x_0) is described by the
cumulative (ᾱ_t, β̄_t, γ̄_t), and q(x_t | x_s) for any s < t by
    α_{s→t} = ᾱ_t / ᾱ_s,   1 - γ_{s→t} = (1 - γ̄_t) / (1 - γ̄_s),   β_{s→t} = (1 - α_{s→t} - γ_{s→t}) / K.
The one-step coefficients are the case s = t - 1.

Schedules (`make_schedule`)
---------------------------
  - ``mask_replace`` (VQ-Diffusion): ᾱ_t linear from ``att_1`` (t = 0) to ``att_T`` (t = T-1), γ̄_t linear
    from ``ctt_1`` to ``ctt_T``, β̄_t = (1 - ᾱ_t - γ̄_t) / K. With the defaults (0.99999 → 0.000009 and
    0.000009 → 0.99999) ᾱ_t + γ̄_t = 0.999999 throughout: replacement is a tiny effect (Kβ̄ = 1e-6).
  - ``absorbing`` (D3PM absorbing / masking diffusion): no replacement (β = 0), γ̄_t = 1 - ᾱ_t, ᾱ_t linear from
    ``att_1`` (default 1 - 1/T) to exactly 0 at t = T-1, so x_{T-1} is all [MASK]. With the default,
    ᾱ_t = 1 - (t + 1) / T: each step masks another 1/T of the tokens.

Posterior with skipping (`log_posterior`)
-----------------------------------------
With a model distribution p̂(x_0) over the K classes, the reverse step from t to any s < t is
    p(x_s | x_t) = Σ_{x0} p̂(x0) q(x_s | x_t, x0),   q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0).
Writing w_i = p̂(i) / q(x_t | x0 = i), this is p(x_s = j | x_t) = q(x_t | x_s = j) Σ_i w_i q(x_s = j | x0 = i),
and the structure of the matrices makes the inner sum O(1) per j:
    Σ_i w_i q(x_s = j | x0 = i) = ᾱ_s w_j + β̄_s Σ_i w_i  (j a class),    γ̄_s Σ_i w_i  (j = [MASK]),
so a reverse step costs O(K) per token and no (K+1) × (K+1) matrix is ever formed. Classes x0 with
q(x_t | x0) = 0 are impossible given x_t and are left out of the sum (the result is renormalised); this only
happens in the absorbing kind, where an unmasked x_t = k forces x_s = x0 = k.

Numerics
--------
The schedule is built in float64 numpy and stored as float32 logs. Zero probabilities are stored as
``LOG_FLOOR`` = log(1e-30) instead of -inf, and log inputs are clamped to it, so that no NaN (nor NaN
gradient) can arise from log(0) or -inf - (-inf). β_{s→t} is a difference of two nearly equal numbers (with
the default schedule 1 - γ_{s→t} and α_{s→t} agree to ~1e-6); it is computed as
    β_{s→t} = β̄_t / (1 - γ̄_s) · (1 - exp(r_s - r_t)),   r_t = log(β̄_t / ᾱ_t),
with r stored as a float32 (hi, lo) pair so that r_s - r_t keeps float64 accuracy.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("mask_replace", "absorbing")

LOG_FLOOR = math.log(1e-30)  # stands for log(0): finite, so that no -inf - (-inf) = NaN can arise

# VQ-Diffusion's default mask-and-replace schedule.
_DEFAULT_ATT_1, _DEFAULT_ATT_T = 0.99999, 0.000009
_DEFAULT_CTT_1, _DEFAULT_CTT_T = 0.000009, 0.99999


# ---------------------------------------------------------------------------------------------- schedule


@flax.struct.dataclass
class DiscreteSchedule:
    """A mask-and-replace (or absorbing) schedule; a frozen pytree (arrays are leaves, K and kind static).

    Build it with `make_schedule`. Every array has shape (T,) and is indexed by the model timestep t (see the
    module docstring); values are float32, logs of zero are ``LOG_FLOOR``.

    Attributes:
      log_abar, log_bbar, log_gbar, log_1m_gbar: log ᾱ_t, log β̄_t, log γ̄_t, log(1 - γ̄_t) of q(x_t | x_0).
      log_alpha, log_beta, log_gamma, log_1m_gamma: the one-step coefficients of q(x_t | x_{t-1})
        (for t = 0 the step from the clean data, equal to the cumulative ones).
      log_ratio_hi, log_ratio_lo: r_t = log(β̄_t / ᾱ_t) as a float32 pair (r ≈ hi + lo), used for β_{s→t}.
      gbar, one_minus_abar: γ̄_t and 1 - ᾱ_t = γ̄_t + Kβ̄_t (both from float64), the thresholds of `q_sample`.
      num_classes: K (the [MASK] index).
      kind: ``"mask_replace"`` or ``"absorbing"``.
    """

    log_abar: jax.Array
    log_bbar: jax.Array
    log_gbar: jax.Array
    log_1m_gbar: jax.Array
    log_alpha: jax.Array
    log_beta: jax.Array
    log_gamma: jax.Array
    log_1m_gamma: jax.Array
    log_ratio_hi: jax.Array
    log_ratio_lo: jax.Array
    gbar: jax.Array
    one_minus_abar: jax.Array
    num_classes: int = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False, default="mask_replace")

    @property
    def num_timesteps(self) -> int:
        return self.log_abar.shape[0]

    @property
    def mask_id(self) -> int:
        return self.num_classes


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(name: str, value, low_open: bool = False, high_open: bool = False) -> float:
    """A float in [0, 1] (open at either end on request)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (0 < value if low_open else 0 <= value)
    ok = ok and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _linear(first: float, last: float, T: int) -> np.ndarray:
    """T values linear from `first` (t = 0) to `last` (t = T-1); for T = 1 the single value is `last`."""
    if T == 1:
        return np.array([last], dtype=np.float64)
    return first + (last - first) * np.arange(T, dtype=np.float64) / (T - 1)


def _log(x: np.ndarray) -> np.ndarray:
    """log in float64 with log(0) (and log of round-off negatives) replaced by LOG_FLOOR."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(np.maximum(x, 0.0)), LOG_FLOOR)


def make_schedule(
    num_classes: int,
    num_timesteps: int,
    kind: str = "mask_replace",
    att_1: float | None = None,
    att_T: float | None = None,
    ctt_1: float | None = None,
    ctt_T: float | None = None,
) -> DiscreteSchedule:
    """Builds a `DiscreteSchedule` (see the module docstring for the two kinds).

    Args:
      num_classes: K >= 1, the number of token classes; [MASK] gets index K.
      num_timesteps: T >= 1.
      kind: ``"mask_replace"`` or ``"absorbing"``.
      att_1, att_T: ᾱ at t = 0 and t = T-1. mask_replace: defaults 0.99999 and 0.000009, need
        0 < att_T <= att_1 <= 1. absorbing: att_1 defaults to 1 - 1/T (for T = 1 it is unused), att_T is
        fixed to 0 and must not be given.
      ctt_1, ctt_T: γ̄ at t = 0 and t = T-1 (mask_replace only; defaults 0.000009 and 0.99999), need
        0 <= ctt_1 <= ctt_T < 1, and att + ctt < 1 at both ends (β̄ > 0: replacement must be possible,
        otherwise use the absorbing kind).

    Raises:
      ValueError: naming the offending argument; also if the per-step replacement probability β_t would be
        negative (the ratio β̄_t / ᾱ_t must not decrease).
    """
    K = _check_int("num_classes", num_classes, 1)
    T = _check_int("num_timesteps", num_timesteps, 1)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    if kind == "mask_replace":
        att_1 = _check_prob("att_1", _DEFAULT_ATT_1 if att_1 is None else att_1, low_open=True)
        att_T = _check_prob("att_T", _DEFAULT_ATT_T if att_T is None else att_T, low_open=True)
        ctt_1 = _check_prob("ctt_1", _DEFAULT_CTT_1 if ctt_1 is None else ctt_1, high_open=True)
        ctt_T = _check_prob("ctt_T", _DEFAULT_CTT_T if ctt_T is None else ctt_T, high_open=True)
        if att_T > att_1:
            raise ValueError(f"att_T must be <= att_1 (ᾱ cannot grow), got att_1={att_1}, att_T={att_T}")
        if ctt_1 > ctt_T:
            raise ValueError(f"ctt_1 must be <= ctt_T (γ̄ cannot shrink), got ctt_1={ctt_1}, ctt_T={ctt_T}")
        for end, a, c in (("1", att_1, ctt_1), ("T", att_T, ctt_T)):
            if not a + c < 1:
                raise ValueError(
                    f"att_{end} + ctt_{end} must be < 1 (no probability left for replacement), got {a} + {c}; "
                    "use kind='absorbing' for a schedule without replacement"
                )
        abar = _linear(att_1, att_T, T)
        gbar = _linear(ctt_1, ctt_T, T)
        bbar = (1.0 - abar - gbar) / K
    else:
        for name, value in (("att_T", att_T), ("ctt_1", ctt_1), ("ctt_T", ctt_T)):
            if value is not None:
                raise ValueError(f"{name} is not a parameter of kind='absorbing' (ᾱ ends at 0, γ̄ = 1 - ᾱ)")
        att_1 = _check_prob("att_1", 1.0 - 1.0 / T if att_1 is None else att_1, low_open=T > 1)
        abar = _linear(att_1, 0.0, T)
        abar[-1] = 0.0  # exactly: x_{T-1} is all [MASK]
        gbar = 1.0 - abar
        bbar = np.zeros(T)

    # Per-step coefficients, from the cumulative ones (ᾱ = 1, γ̄ = 0 before the first step). The validation
    # above guarantees ᾱ_{t-1} > 0 and γ̄_{t-1} < 1 (only the absorbing kind's last ᾱ is 0).
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    gbar_prev = np.concatenate([[0.0], gbar[:-1]])
    alpha = abar / abar_prev
    one_minus_gamma = (1.0 - gbar) / (1.0 - gbar_prev)
    beta = (one_minus_gamma - alpha) / K
    if kind == "mask_replace":
        # β_t K = (1-γ̄_t)/(1-γ̄_{t-1}) - ᾱ_t/ᾱ_{t-1} >= 0  <=>  β̄_t/ᾱ_t >= β̄_{t-1}/ᾱ_{t-1}.
        bad = np.nonzero(beta < -1e-12)[0]
        if bad.size:
            raise ValueError(
                f"att_1, att_T, ctt_1, ctt_T give a negative replacement probability β_t at t={bad[0]} "
                f"({beta[bad[0]]:.3g}): β̄_t / ᾱ_t must not decrease"
            )
    else:
        beta = np.zeros(T)  # exact: 1 - γ_t = α_t
    beta = np.maximum(beta, 0.0)
    gamma = 1.0 - one_minus_gamma

    ratio = _log(bbar) - _log(abar)
    ratio_hi = ratio.astype(np.float32)
    ratio_lo = (ratio - ratio_hi.astype(np.float64)).astype(np.float32)

    f32 = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
    return DiscreteSchedule(
        log_abar=f32(_log(abar)),
        log_bbar=f32(_log(bbar)),
        log_gbar=f32(_log(gbar)),
        log_1m_gbar=f32(_log(1.0 - gbar)),
        log_alpha=f32(_log(alpha)),
        log_beta=f32(_log(beta)),
        log_gamma=f32(_log(gamma)),
        log_1m_gamma=f32(_log(one_minus_gamma)),
        log_ratio_hi=f32(ratio_hi),
        log_ratio_lo=f32(ratio_lo),
        gbar=f32(gbar),
        one_minus_abar=f32(1.0 - abar),
        num_classes=K,
        kind=kind,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0 (x is clipped to 0), accurate at both ends, floored at LOG_FLOOR."""
    x = jnp.minimum(x, 0.0)
    out = jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
    return jnp.maximum(out, LOG_FLOOR)


def _check_timesteps(t: jax.Array, batch: int, name: str) -> jax.Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar or have shape (batch,) = ({batch},), got shape {t.shape}")
    return jnp.broadcast_to(t, (batch,))


def _cumulative(sched: DiscreteSchedule, t: jax.Array) -> dict[str, jax.Array]:
    """The cumulative log coefficients at timesteps t (B,), with the clean values (ᾱ = 1) where t < 0.

    Every value is returned with shape (B, 1, 1), ready to broadcast against (B, L, K) arrays.
    """
    clean = t < 0
    i = jnp.clip(t, 0, sched.num_timesteps - 1)
    pick = lambda arr, clean_value: jnp.where(clean, clean_value, arr[i])[:, None, None]  # noqa: E731
    return {
        "la": pick(sched.log_abar, 0.0),
        "lb": pick(sched.log_bbar, LOG_FLOOR),
        "lc": pick(sched.log_gbar, LOG_FLOOR),
        "l1mc": pick(sched.log_1m_gbar, 0.0),
        "r_hi": pick(sched.log_ratio_hi, LOG_FLOOR),
        "r_lo": pick(sched.log_ratio_lo, 0.0),
        "clean": clean[:, None, None],
    }


def _step_coefficients(cs: dict, ct: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log α_{s→t}, log β_{s→t}, log γ_{s→t} of q(x_t | x_s) from the cumulative coefficients at s and t."""
    log_alpha = ct["la"] - cs["la"]
    log_gamma = _log1mexp(ct["l1mc"] - cs["l1mc"])
    # β_{s→t} = (β̄_t ᾱ_s - ᾱ_t β̄_s) / ((1 - γ̄_s) ᾱ_s) = β̄_t / (1 - γ̄_s) · (1 - exp(r_s - r_t)).
    r_diff = (cs["r_hi"] - ct["r_hi"]) + (cs["r_lo"] - ct["r_lo"])
    log_beta = ct["lb"] - cs["l1mc"] + _log1mexp(r_diff)
    log_beta = jnp.where(cs["clean"], ct["lb"], log_beta)  # from the clean data: exactly β̄_t
    return log_alpha, jnp.maximum(log_beta, LOG_FLOOR), log_gamma


def _as_log_probs(log_p: jax.Array) -> jax.Array:
    """float32, with -inf (and anything below) raised to LOG_FLOOR."""
    return jnp.maximum(log_p.astype(jnp.float32), LOG_FLOOR)


def _log_normalize(x: jax.Array) -> jax.Array:
    return x - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def log_onehot(x: jax.Array, num_states: int) -> jax.Array:
    """log of one-hot(x) over `num_states` states, zeros as LOG_FLOOR; float32 (..., num_states)."""
    return jnp.where(jnp.arange(num_states) == x[..., None], 0.0, LOG_FLOOR).astype(jnp.float32)


def _with_mask_column(log_p: jax.Array, mask_value) -> jax.Array:
    """Appends the [MASK] entry `mask_value` (broadcast) to a (..., K) array."""
    return jnp.concatenate([log_p, jnp.broadcast_to(mask_value, log_p.shape[:-1] + (1,))], axis=-1)


# ---------------------------------------------------------------------------------------------- forward


def q_sample(sched: DiscreteSchedule, x0: jax.Array, t: jax.Array, rng: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) for tokens x0 (B, L) at timesteps t (B,); int32 (B, L).

    Per token, one uniform u decides: u < γ̄_t → [MASK]; u < 1 - ᾱ_t = γ̄_t + Kβ̄_t → a uniformly drawn class
    (which may be x0 itself: that is the β̄_t of q(x_t = x0 | x0) = ᾱ_t + β̄_t); otherwise x0. O(1) per token,
    and exact at the ends: where γ̄_t = 1 (absorbing, t = T-1) every token is masked. t < 0 returns x0;
    [MASK] tokens in x0 stay [MASK].
    """
    x0 = jnp.asarray(x0).astype(jnp.int32)
    t = _check_timesteps(t, x0.shape[0], "t")
    i = jnp.clip(t, 0, sched.num_timesteps - 1)
    gbar = jnp.where(t < 0, 0.0, sched.gbar[i]).reshape((-1,) + (1,) * (x0.ndim - 1))
    one_minus_abar = jnp.where(t < 0, 0.0, sched.one_minus_abar[i]).reshape(gbar.shape)
    k_u, k_c = jax.random.split(rng)
    u = jax.random.uniform(k_u, x0.shape, jnp.float32)
    replacement = jax.random.randint(k_c, x0.shape, 0, sched.num_classes, jnp.int32)
    x_t = jnp.where(u < gbar, sched.mask_id, jnp.where(u < one_minus_abar, replacement, x0))
    return jnp.where(x0 == sched.mask_id, sched.mask_id, x_t).astype(jnp.int32)


def log_q_xt_given_x0(sched: DiscreteSchedule, log_x0: jax.Array, t: jax.Array) -> jax.Array:
    """log Σ_{x0} p(x0) q(x_t | x0) for a log distribution p over K or K+1 states; (B, L, K+1) float32.

    With P = Σ_{i<K} p(i): class j gets ᾱ_t p(j) + β̄_t P, [MASK] gets γ̄_t P + p([MASK]). One-hot inputs
    (zeros as -inf or LOG_FLOOR) give the rows of the cumulative matrix. t (B,); t < 0 returns log_x0 itself.
    """
    K = sched.num_classes
    if log_x0.shape[-1] not in (K, K + 1):
        raise ValueError(f"log_x0 must have {K} or {K + 1} entries on its last axis, got shape {log_x0.shape}")
    lp = _as_log_probs(log_x0)
    if lp.shape[-1] == K:
        lp = _with_mask_column(lp, LOG_FLOOR)
    t = _check_timesteps(t, lp.shape[0], "t")
    c = _cumulative(sched, t)
    classes, p_mask = lp[..., :K], lp[..., K:]
    total = jax.nn.logsumexp(classes, axis=-1, keepdims=True)  # log P
    out_classes = jnp.logaddexp(c["la"] + classes, c["lb"] + total)
    out_mask = jnp.logaddexp(c["lc"] + total, p_mask)
    return jnp.maximum(jnp.concatenate([out_classes, out_mask], axis=-1), LOG_FLOOR)


# ---------------------------------------------------------------------------------------------- reverse


def log_posterior(
    sched: DiscreteSchedule, log_x0_hat: jax.Array, x_t: jax.Array, t: jax.Array, s: jax.Array
) -> jax.Array:
    """log p(x_s | x_t) = log Σ_{x0} p̂(x0) q(x_s | x_t, x0) for s < t; normalised, (B, L, K+1) float32.

    Args:
      sched: the schedule.
      log_x0_hat: (B, L, K) log p̂(x0) over the K classes (e.g. a model's log_softmax; need not be exactly
        normalised: it is used as weights).
      x_t: (B, L) int tokens in 0..K.
      t: (B,) int timesteps, 0 <= t <= T-1.
      s: (B,) or scalar int target timesteps, s < t (s = t - 1: one ordinary step; larger gaps skip steps).
        Where s < 0 the result is log p̂(x0) itself with [MASK] at LOG_FLOOR (absorbing kind: only where x_t
        is [MASK]; an unmasked x_t is kept, see below).

    See the module docstring for the O(K) formula. For an unmasked x_t = k, x_s cannot be [MASK] (LOG_FLOOR);
    in the absorbing kind it must be k (one-hot).
    """
    K = sched.num_classes
    if log_x0_hat.shape[-1] != K:
        raise ValueError(f"log_x0_hat must have K = {K} entries on its last axis, got shape {log_x0_hat.shape}")
    lp = _as_log_probs(log_x0_hat)
    B = lp.shape[0]
    x_t = jnp.asarray(x_t).astype(jnp.int32)
    t = _check_timesteps(t, B, "t")
    s = _check_timesteps(s, B, "s")
    ct, cs = _cumulative(sched, t), _cumulative(sched, s)
    log_alpha, log_beta, log_gamma = _step_coefficients(cs, ct)

    is_k = jnp.arange(K) == x_t[..., None]  # (B, L, K); all False where x_t is [MASK]
    x_t_masked = (x_t == sched.mask_id)[..., None]

    # x_t = k, a class. w_i = p̂(i) / q(x_t = k | x0 = i), with q = ᾱ_t + β̄_t for i = k and β̄_t otherwise.
    log_w = lp - jnp.where(is_k, jnp.logaddexp(ct["la"], ct["lb"]), ct["lb"])
    log_sum_w = jax.nn.logsumexp(log_w, axis=-1, keepdims=True)
    log_mix = jnp.logaddexp(cs["la"] + log_w, cs["lb"] + log_sum_w)  # log Σ_i w_i q(x_s = j | x0 = i)
    log_step = jnp.where(is_k, jnp.logaddexp(log_alpha, log_beta), log_beta)  # log q(x_t = k | x_s = j)
    unmasked = _with_mask_column(_log_normalize(log_step + log_mix), LOG_FLOOR)
    if sched.kind == "absorbing":
        unmasked = log_onehot(x_t, K + 1)  # nothing moves but to [MASK]: x_s = x_t = x0

    # x_t = [MASK]. q(x_t = [MASK] | x0 = i) = γ̄_t for every class i, a constant that the normalisation
    # removes, so w = p̂. q(x_t = [MASK] | x_s = j) = γ_{s→t} for a class j, 1 for j = [MASK].
    log_total = jax.nn.logsumexp(lp, axis=-1, keepdims=True)
    mix_classes = jnp.logaddexp(cs["la"] + lp, cs["lb"] + log_total)
    masked = _log_normalize(
        jnp.concatenate([log_gamma + mix_classes, cs["lc"] + log_total], axis=-1)
    )

    out = jnp.where(x_t_masked, masked, unmasked)
    # s < 0 (clean data): q(x_{-1} | x_t, x0) = δ(x0), so the result is p̂ itself, except where the absorbing
    # kind has an unmasked x_t, which pins x0 to x_t (the one-hot above).
    final = _with_mask_column(lp, LOG_FLOOR)
    if sched.kind == "absorbing":
        final = jnp.where(x_t_masked, final, unmasked)
    out = jnp.where(cs["clean"], final, out)
    return jnp.maximum(out, LOG_FLOOR)


def losses(
    sched: DiscreteSchedule,
    logits_x0: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-example training losses (nats per token), each of shape (B,).

    Args:
      logits_x0: (B, L, K) the model's x0 logits (no [MASK] class); p̂ = softmax(logits_x0).
      x0: (B, L) clean tokens in 0..K-1.
      x_t: (B, L) noised tokens (from `q_sample(sched, x0, t, ...)`).
      t: (B,) int timesteps in 0..T-1.
      weights: (B, L) position weights (e.g. a padding mask); default all ones.

    Returns:
      ``vlb``: the variational bound term, for t >= 1 KL(q(x_{t-1} | x_t, x0) ‖ p_θ(x_{t-1} | x_t)) with
        p_θ = `log_posterior` at x̂0 = p̂, and for t = 0 the decoder term -log p_θ(x0 | x_t) = -log p̂(x0);
      ``x0_ce``: the auxiliary cross-entropy -log p̂(x0);
      both averaged over positions with `weights` (a row with zero total weight gives 0).
    """
    K = sched.num_classes
    log_p = jax.nn.log_softmax(logits_x0.astype(jnp.float32), axis=-1)
    x0 = jnp.asarray(x0).astype(jnp.int32)
    t = _check_timesteps(t, x0.shape[0], "t")
    ce = -jnp.sum(jnp.where(jnp.arange(K) == x0[..., None], log_p, 0.0), axis=-1)  # (B, L)

    s = t - 1
    log_true = log_posterior(sched, log_onehot(x0, K), x_t, t, s)
    log_model = log_posterior(sched, log_p, x_t, t, s)
    kl = jnp.sum(jnp.exp(log_true) * (log_true - log_model), axis=-1)
    vlb = jnp.where((t == 0)[:, None], ce, kl)

    if weights is None:
        weights = jnp.ones(x0.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights, axis=-1), 1e-12)
    mean = lambda v: jnp.sum(v * weights, axis=-1) / denom  # noqa: E731
    return {"vlb": mean(vlb), "x0_ce": mean(ce)}


# ---------------------------------------------------------------------------------------------- timesteps


def sample_timesteps(
    rng: jax.Array,
    batch_size: int,
    num_timesteps: int,
    history: jax.Array | None = None,
    counts: jax.Array | None = None,
    min_count: int = 10,
) -> tuple[jax.Array, jax.Array]:
    """Draws training timesteps t (B,) int32 and their probabilities pt (B,) float32.

    Uniform (pt = 1/T) when `history` is None or any entry of `counts` is below `min_count`; otherwise
    importance sampling with pt ∝ sqrt(history + 1e-10) (history: running mean of the squared loss per t,
    see `update_loss_history`), so that a loss weighted by 1/(T pt) keeps the uniform expectation and has
    lower variance. Jittable: the switch is a `jnp.where` on the traced counts.
    """
    T = num_timesteps
    uniform = jnp.full((T,), 1.0 / T, jnp.float32)
    if history is None:
        probs = uniform
    else:
        if counts is None:
            raise ValueError("counts must be given together with history")
        root = jnp.sqrt(history.astype(jnp.float32) + 1e-10)
        ready = jnp.all(counts >= min_count)
        probs = jnp.where(ready, root / jnp.sum(root), uniform)
    t = jax.random.categorical(rng, jnp.log(probs), shape=(batch_size,)).astype(jnp.int32)
    return t, probs[t]


def update_loss_history(
    history: jax.Array, counts: jax.Array, t: jax.Array, loss: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Updates the per-timestep loss statistics with a batch of per-example losses (B,) at timesteps t (B,).

    For each timestep τ present in the batch: history[τ] ← 0.9 history[τ] + 0.1 · mean_{b: t_b = τ} loss_b²
    and counts[τ] += #{b: t_b = τ}; other entries are unchanged. Computed as a (B, T) one-hot reduction, so
    the result does not depend on any scatter order. The loss is not differentiated through.
    """
    T = history.shape[0]
    sq = jnp.square(jax.lax.stop_gradient(loss).astype(jnp.float32))
    hits = (t[:, None] == jnp.arange(T)).astype(jnp.float32)  # (B, T)
    n = jnp.sum(hits, axis=0)
    mean_sq = jnp.sum(hits * sq[:, None], axis=0) / jnp.maximum(n, 1.0)
    new_history = jnp.where(n > 0, 0.9 * history + 0.1 * mean_sq, history)
    return new_history.astype(history.dtype), (counts + n).astype(counts.dtype)


# ---------------------------------------------------------------------------------------------- sampling


def guided_log_probs(log_p_cond: jax.Array, log_p_weak: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: log_softmax(log p_weak + scale (log p_cond - log p_weak)) on the last axis.

    scale = 1 gives the conditional model, 0 the weak (unconditional) one. Inputs are clamped at LOG_FLOOR so
    that -inf entries cannot give NaN.
    """
    cond, weak = _as_log_probs(log_p_cond), _as_log_probs(log_p_weak)
    return jax.nn.log_softmax(weak + scale * (cond - weak), axis=-1)


def truncate_log_probs(log_p: jax.Array, rate: float) -> jax.Array:
    """Top-mass truncation of x̂0 (VQ-Diffusion's sampling ``truncation_rate``): per row of the last axis, the
    most probable classes whose probabilities sum to ``rate`` keep their mass (the class that crosses it
    included, and the argmax always), the rest are set to LOG_FLOOR, then renormalised. rate >= 1: unchanged."""
    if rate >= 1.0:
        return log_p
    log_p = _as_log_probs(log_p)
    p = jnp.exp(log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True))
    ranked = -jnp.sort(-p, axis=-1)
    before = jnp.cumsum(ranked, axis=-1) - ranked            # mass strictly above each ranked class
    kept = jnp.where(before < rate, ranked, jnp.inf)          # the classes inside the top mass
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(p >= threshold, log_p, LOG_FLOOR), axis=-1)


def sample_categorical(rng: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One draw per row of the last axis (Gumbel-max: argmax of log_probs + Gumbel noise); int32."""
    gumbel = jax.random.gumbel(rng, log_probs.shape, jnp.float32)
    return jnp.argmax(log_probs.astype(jnp.float32) + gumbel, axis=-1).astype(jnp.int32)


def denoise_step(
    sched: DiscreteSchedule,
    log_x0_hat: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    s: jax.Array,
    rng: jax.Array,
) -> jax.Array:
    """One reverse step: x_s ~ `log_posterior`(log_x0_hat, x_t, t, s); where s < 0, the most likely x0.

    The final step (s < 0) is deterministic: the argmax over the K classes of the posterior, which is the
    argmax of log_x0_hat (for the absorbing kind: at [MASK] positions; unmasked x_t tokens are kept, as the
    posterior is one-hot there). Returns int32 (B, L) tokens in 0..K, mask-free after the final step.
    """
    log_post = log_posterior(sched, log_x0_hat, x_t, t, s)
    x_s = sample_categorical(rng, log_post)
    s = _check_timesteps(s, x_s.shape[0], "s")
    final = jnp.argmax(log_post[..., : sched.num_classes], axis=-1).astype(jnp.int32)
    return jnp.where((s < 0)[:, None], final, x_s)
