"""Fixtures shared by several test directories."""

from __future__ import annotations

import os

# The suite runs on the CPU. With libtpu installed (the tpu extra, for tests/test_aot.py, which gets its
# TPU devices from libtpu's topology description instead) JAX would otherwise probe for a TPU in every
# process it starts, and log libtpu's warnings. Set before anything imports JAX; subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402


def _encoded_as_arrays(value):
    """tfds 4.9.10's mock encodes a Sequence(Text) as a list of 0-d object arrays, which
    `tf.data.Dataset.from_generator` rejects ("Unsupported object type numpy.ndarray") whenever
    decoders are passed; the real TFRecord writer accepts it. Turn such lists into 1-d arrays."""
    if isinstance(value, dict):
        return {k: _encoded_as_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return np.array([np.asarray(v).item() for v in value], dtype=object)
    return value


@pytest.fixture
def mock_coco(tmp_path, monkeypatch):
    """`coco_captions/2014` mocked with real split metadata (train 3, restval 2, val 4, test 5)."""
    from tensorflow_datasets.testing import mocking

    original = mocking.EncodedRandomFakeGenerator.__iter__
    monkeypatch.setattr(mocking.EncodedRandomFakeGenerator, "__iter__",
                        lambda self: (_encoded_as_arrays(ex) for ex in original(self)))
    builder = tfds.builder("coco_captions/2014", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
        for name, n in [("train", 3), ("restval", 2), ("val", 4), ("test", 5)]]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        yield str(tmp_path)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """shapes_captions/tiny, built once for the session."""
    from ladic_jax.data import datasets
    d = str(tmp_path_factory.mktemp("tfds"))
    datasets.build("shapes_captions", d, "tiny")
    return d


REAL_DATASETS = ("karpathy_captions/coco", "karpathy_captions/flickr8k", "karpathy_captions/flickr30k",
                 "karpathy_captions/flickr30k+8k", "cub_captions/default", "cub_captions/unseen_classes")


@pytest.fixture(scope="session")
def real_data(tmp_path_factory):
    """Every real-dataset builder built from tiny fake files in the true layouts (tests/fake_datasets.py),
    once for the session: (manual_dir, data_dir, expected records by dataset and split)."""
    import fake_datasets

    from ladic_jax.data import datasets

    tfds.display_progress_bar(False)
    root = tmp_path_factory.mktemp("real_datasets")
    manual, data = str(root / "manual"), str(root / "tfds")
    expected = fake_datasets.write_all(manual)
    for name in REAL_DATASETS:
        base, config = name.split("/")
        datasets.build(base, data, config, manual)
    return manual, data, expected


@pytest.fixture(scope="session")
def real_data_dir(real_data):
    """The TFDS data dir holding every real dataset built from its fake layout."""
    return real_data[1]


@pytest.fixture(scope="session")
def bad_data_dir(tmp_path_factory):
    """The dataset of bad records of tests/bad_dataset.py, built once."""
    import bad_dataset

    d = str(tmp_path_factory.mktemp("bad_tfds"))
    bad_dataset.LadicBadCaptions(data_dir=d).download_and_prepare()
    return d
