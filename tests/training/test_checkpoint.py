"""Checkpointer faults on a small state (no model, in-process): damaged files of the newest checkpoint are
detected and reported by path, and the previous checkpoint is used; a workdir whose checkpoints are all
damaged is an error, not a silent fresh start."""

from __future__ import annotations

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladic_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, fingerprint


def _state(seed: int) -> dict:
    key = jax.random.key(seed)
    return {"step": jnp.int32(seed), "rng": key, "mask": jnp.array([True, False, seed % 2 == 0]),
            "params": {"w": jax.random.normal(key, (64, 32)), "b": jnp.arange(5, dtype=jnp.float32) * seed}}


def _save(directory: str, steps) -> None:
    ck = Checkpointer(directory, keep=5)
    for s in steps:
        ck.save(s, _state(s), {"step": s})
    ck.close()


def _largest_data_file(directory: str, step: int) -> str:
    return max(glob.glob(os.path.join(directory, str(step), "state", "ocdbt.process_0", "d", "*")),
               key=os.path.getsize)


def _flip_middle_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    # A flipped byte inside a zstd chunk still decodes (to other numbers): only the checksums catch it.
    "flipped_byte": (_flip_middle_byte, "is corrupted: "),
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "is unreadable"),
    "overwritten": (lambda p: open(p, "r+b").write(os.urandom(os.path.getsize(p))), "is unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_by_path_and_the_previous_one_used(tmp_path, caplog, damage):
    d = str(tmp_path / "ck")
    _save(d, [1, 2])
    hurt, message = DAMAGE[damage]
    hurt(_largest_data_file(d, 2))
    ck = Checkpointer(d, read_only=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {d}/2 {message}"):
        ck.restore(2, abstract_like(_state(0)))
    with caplog.at_level(logging.ERROR, logger="ladic_jax.checkpoint"):
        step, state, meta = ck.restore_latest_good(abstract_like(_state(0)))
    ck.close()
    assert step == 1 and meta == {"step": 1}
    assert f"checkpoint {d}/2 {message}" in caplog.text and "trying the previous one" in caplog.text
    assert fingerprint(state) == fingerprint(_state(1))
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(1)["params"]["w"]))


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
    d = str(tmp_path / "ck")
    _save(d, [1, 2])
    for step in (1, 2):
        os.truncate(_largest_data_file(d, step), 10)
    ck = Checkpointer(d, read_only=True)
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint in {d}: checkpoint {d}/2 is unreadable.*"
                                              rf"checkpoint {d}/1 is unreadable"):
        ck.restore_latest_good(abstract_like(_state(0)))
    ck.close()
    empty = Checkpointer(str(tmp_path / "none"), read_only=True)
    assert empty.restore_latest_good(abstract_like(_state(0))) is None  # no checkpoint at all: a fresh run
    empty.close()


def test_fingerprint_sees_every_word_and_its_position():
    base = _state(3)
    fp = fingerprint(base)
    assert fp == fingerprint(_state(3))
    w = np.asarray(base["params"]["w"])
    flipped = w.copy()
    flipped.view(np.uint32)[17, 5] ^= 1 << 31  # one bit of one float
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same words in another order
    for changed in (flipped, swapped):
        other = fingerprint(dict(base, params=dict(base["params"], w=jnp.asarray(changed))))
        assert [k for k in fp if fp[k] != other[k]] == ["params/w"]
    assert fingerprint(dict(base, rng=jax.random.key(4)))["rng"] != fp["rng"]
    assert fingerprint(dict(base, mask=~base["mask"]))["mask"] != fp["mask"]
