"""The coca family's losses against closed forms and an independent numpy computation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.families.coca import caption_loss, same_caption, sigmoid_contrastive, softmax_contrastive


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("batch,log_scale", [(2, 0.0), (5, math.log(10.0)), (8, 2.6592)])
def test_softmax_contrastive_closed_form_on_orthonormal_pairs(batch, log_scale):
    # Image i and text i are the same unit vector, orthogonal to every other: cos = 1 on the diagonal, 0 off it,
    # so both directions' cross-entropy is log(1 + (B - 1) e^{-s}) with s = exp(log_scale).
    e = np.eye(batch, dtype=np.float32)
    got = softmax_contrastive(jnp.asarray(e), jnp.asarray(e), jnp.float32(log_scale), jnp.eye(batch, dtype=bool))
    s = math.exp(log_scale)
    # abs: the float32 log-sum-exp of logits near s resolves the small loss to about ulp(s) ~ 1e-6.
    assert float(got) == pytest.approx(math.log(1 + (batch - 1) * math.exp(-s)), rel=1e-5, abs=4e-6)


def test_sigmoid_contrastive_closed_form_on_orthonormal_pairs():
    batch, t, b = 4, math.log(10.0), -10.0
    e = np.eye(batch, dtype=np.float32)
    got = sigmoid_contrastive(jnp.asarray(e), jnp.asarray(e), jnp.float32(t), jnp.float32(b),
                              jnp.eye(batch, dtype=bool))
    s = math.exp(t)
    # Positives: -log σ(s + b); negatives (cos 0): -log σ(-b); summed over the B² pairs, divided by B.
    expected = (batch * math.log1p(math.exp(-(s + b))) + batch * (batch - 1) * math.log1p(math.exp(b))) / batch
    assert float(got) == pytest.approx(expected, rel=1e-5)


def _softmax_reference(img, txt, scale, positives):
    """Per-row loops in float64: the mean over rows of -Σ_j target_ij log softmax_j, both directions."""
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    total = 0.0
    for mat, pos in ((logits, positives), (logits.T, positives.T)):
        rows = []
        for i in range(mat.shape[0]):
            logz = math.log(sum(math.exp(v) for v in mat[i]))
            target = pos[i] / pos[i].sum()
            rows.append(-sum(target[j] * (mat[i, j] - logz) for j in range(mat.shape[1])))
        total += sum(rows) / len(rows)
    return total / 2


def test_softmax_contrastive_matches_reference_with_shared_captions():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    tokens = np.array([[1, 4, 2], [1, 5, 2], [1, 4, 2], [1, 6, 2], [1, 7, 2], [1, 5, 2]])  # rows 0/2, 1/5 share
    positives = np.asarray(same_caption(jnp.asarray(tokens)))
    expected_positives = np.eye(6, dtype=bool)
    for i, j in ((0, 2), (1, 5)):
        expected_positives[i, j] = expected_positives[j, i] = True
    np.testing.assert_array_equal(positives, expected_positives)
    got = softmax_contrastive(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(1.7),
                              jnp.asarray(positives))
    assert float(got) == pytest.approx(_softmax_reference(img, txt, math.exp(1.7), positives), rel=1e-5)


def test_sigmoid_contrastive_matches_reference():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 4)))
    positives = np.eye(5, dtype=bool)
    positives[0, 3] = positives[3, 0] = True
    t, b = 1.2, -2.5
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if positives[i, j] else -1.0
            logit = math.exp(t) * float(img[i] @ txt[j]) + b
            expected += math.log1p(math.exp(-z * logit))
    got = sigmoid_contrastive(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(t),
                              jnp.float32(b), jnp.asarray(positives))
    assert float(got) == pytest.approx(expected / 5, rel=1e-5)


def test_caption_loss_is_the_weighted_mean_next_token_nll():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
    targets = np.array([[1, 3, 0], [2, 2, 1]])
    weights = np.array([[1, 1, 0], [1, 0, 0]])
    nll, hits = [], []
    for b in range(2):
        for i in range(3):
            if weights[b, i]:
                row = logits[b, i].astype(np.float64)
                nll.append(math.log(np.exp(row).sum()) - row[targets[b, i]])
                hits.append(int(np.argmax(row) == targets[b, i]))
    ce, acc = caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    assert float(ce) == pytest.approx(np.mean(nll), rel=1e-5)
    assert float(acc) == pytest.approx(np.mean(hits))
