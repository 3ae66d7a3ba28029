"""Checkpointer faults on a small state (no model, in-process): damaged files of the newest checkpoint are
detected and reported by path, and the previous checkpoint is used; a workdir whose checkpoints are all
damaged is an error, not a silent fresh start."""

from __future__ import annotations

import glob
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
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


def test_resuming_sets_damaged_checkpoints_aside_so_their_steps_can_be_saved_again(tmp_path):
    """A run that falls back from a damaged checkpoint trains its step again and must be able to save it:
    orbax refuses a step that exists (StepAlreadyExistsError), so resuming renames the damaged one."""
    d = str(tmp_path / "ck")
    _save(d, [1, 2, 3])
    for _ in range(2):  # twice: the second damaged copy of step 3 must not collide with the first
        os.truncate(_largest_data_file(d, 3), 10)
        ck = Checkpointer(d, keep=5)
        step, _, _ = ck.restore_latest_good(abstract_like(_state(0)), set_aside=True)
        assert step == 2 and ck.all_steps() == [1, 2]
        ck.save(3, _state(3), {"step": 3})
        ck.close()
        ck = Checkpointer(d, read_only=True)
        step, state, _ = ck.restore_latest_good(abstract_like(_state(0)))
        ck.close()
        assert step == 3 and fingerprint(state) == fingerprint(_state(3))
    assert sorted(os.listdir(d)) == ["1", "2", "3", "3.unusable", "3.unusable-2"]
    # Without set_aside (a read-only look, e.g. evaluation) nothing is renamed.
    os.truncate(_largest_data_file(d, 3), 10)
    ck = Checkpointer(d, read_only=True)
    assert ck.restore_latest_good(abstract_like(_state(0)))[0] == 2
    ck.close()
    assert "3" in os.listdir(d)


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


def test_checkpoint_damaged_on_one_process_only_is_passed_over_by_both(tmp_path, compile_cache):
    """Two real processes, the state split over them; only process 1's files of the newest checkpoint
    are damaged, so only its read fails. Both must agree to fall back to the previous checkpoint (the
    failing process must not leave the other waiting in a barrier of orbax's restore)."""
    d = str(tmp_path / "ck")
    helper = os.path.join(launch.HERE, "two_process_checkpoint.py")

    def pair(mode):
        port = launch.free_port()
        procs = [launch.Proc([sys.executable, helper, str(port), str(i), mode, d], launch.env(compile_cache),
                             str(tmp_path / f"{mode}_p{i}")) for i in range(2)]
        try:
            codes = [p.wait(timeout=180) for p in procs]  # a hang guard: a deadlock fails here
        finally:
            for p in procs:
                p.close()
        assert codes == [0, 0], [p.err[-3000:] for p in procs]
        return procs

    pair("save")
    own = glob.glob(os.path.join(d, "2", "state", "ocdbt.process_1", "d", "*"))
    assert own, os.listdir(os.path.join(d, "2", "state"))
    for f in own:
        os.truncate(f, os.path.getsize(f) // 2)
    p0, p1 = pair("restore")
    assert "RESTORED 1 True" in p0.out and "RESTORED 1 True" in p1.out
    assert f"checkpoint {d}/2 is unreadable (" in p1.err
    assert f"checkpoint {d}/2 is unreadable on another process" in p0.err
    assert sorted(os.listdir(d)) == ["1", "2.unusable"]
