"""Helpers shared by the export tests (test_clip_export.py, test_dual_encoder.py)."""

from __future__ import annotations

import numpy as np
from flax import traverse_util


def pixels(batch: int = 2) -> np.ndarray:
    """A fixed batch of 32x32 images, NCHW as PyTorch takes them."""
    return np.random.default_rng(1).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def assert_identical(ours, expected) -> None:
    """Same parameter names, dtypes, shapes and bits."""
    ours, expected = flat(ours), flat(expected)
    assert sorted(ours) == sorted(expected)
    for path, value in expected.items():
        assert ours[path].dtype == value.dtype and ours[path].shape == value.shape, path
        assert np.array_equal(ours[path], value), path
