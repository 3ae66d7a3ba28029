"""Checkpoints of a run: orbax CheckpointManager over the train state plus a JSON record.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the pytree of arrays (params,
optimizer state, step, rng), restored directly onto the target shardings; ``meta`` is a small JSON
dict (input position, config, notes) plus a checksum of every array of ``state``. Every process of a
multi-process run takes part in every save and restore (each writes and reads its own shards).

Failures, and what they do:

* Saves are asynchronous: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when
  complete, so a process killed mid-save leaves only a temporary directory, which is ignored and
  removed by the next writer. A save that fails in the background (disk full, permissions) raises
  ``CheckpointError`` naming the checkpoint's path and the reason from ``poll()`` (non-blocking, called
  every step by the trainer), ``wait()``, the next ``save()`` or ``close()``: never silently lost.
* ``restore`` raises ``CheckpointError`` naming the path when orbax cannot read a checkpoint (truncated
  or garbled files) or when the restored arrays do not match the checksums written at save time
  (corruption that still decodes, e.g. a flipped byte: zstd chunks carry no checksum of their own).
  ``restore_latest_good`` logs each such checkpoint and falls back to the previous one; if none is
  usable it raises rather than let a run silently start again from scratch. A resuming run has the
  unusable ones renamed ``<step>.unusable`` (kept for a post-mortem), since it will save those steps again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from ladic_jax.sharding import every_process, path_str

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "state_fingerprint"


class CheckpointError(RuntimeError):
    pass


def _reason(e: BaseException, head: int = 200, tail: int = 250) -> str:
    """A one-line account of an orbax/tensorstore error (their messages can run to a page): its start (what
    was being done) and its end (the root cause, e.g. "No space left on device [os_error_code='28']")."""
    text = f"{type(e).__name__}: {e}".split("See full TensorStore details")[0]
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """sum_i word_i * (2 i + 1) mod 2**32 over the array's raw 32-bit (or narrower) words, i the flat index.

    Any change of a single word changes the sum (the weights are odd); reordered words change it too.
    Computed element-wise from iotas, so it needs no reshape of sharded arrays.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        w = x.astype(jnp.uint32)
    else:
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        w = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)  # 8-byte: a trailing axis of 2
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
        stride = (stride * w.shape[d]) % 2**32
    return jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def fingerprint(tree: Any) -> dict[str, int]:
    """Checksum of the exact bits of every array of a pytree, by path (same on every process)."""
    sums = jax.device_get(_checksums(tree))
    return {path_str(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._reader = ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler(),
                                                      meta=ocp.JsonCheckpointHandler())
        self._pending: int | None = None  # step of a save that may still be running in the background
        self._closed = False

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        """The error to stop the run with; orbax's threads are released now, so that none is left to print
        tracebacks into the user's terminal after the message."""
        good = max((s for s in self._mgr.all_steps() if s != step), default=None)
        self._release()
        good = f"the newest complete checkpoint is {self.path(good)}" if good is not None else \
            "no complete checkpoint exists"
        return CheckpointError(f"saving checkpoint {self.path(step)} failed ({_reason(e)}); {good}")

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        """Starts an asynchronous save (after the previous one has finished; its failure raises here)."""
        self.wait()
        meta = dict(meta, **{FINGERPRINT_KEY: fingerprint(state)})
        try:
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - whatever orbax raises, the checkpoint is not there
            raise self._save_failed(step, e) from e
        self._pending = step

    def poll(self) -> None:
        """Raises CheckpointError if a background save has failed; never blocks on one still running."""
        if self._pending is not None and not self._mgr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the last save is on disk; raises CheckpointError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from e

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings given by ``abstract_state`` (ShapeDtypeStructs), checked
        against the checksums saved with it. Every process calls it and gets the same outcome.

        Read by orbax's handler, not the manager: the manager's restore ends in a barrier, which a process
        whose read failed (its shards damaged, the others' not) would miss while the others wait in it."""
        error = None
        try:
            out = self._reader.restore(epath.Path(self.path(step)), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for unreadable files
            error = CheckpointError(f"checkpoint {self.path(step)} is unreadable ({_reason(e)})")
            error.__cause__ = e
        if not every_process(error is None):
            raise error or CheckpointError(f"checkpoint {self.path(step)} is unreadable on another process")
        state, meta = out["state"], dict(out["meta"] or {})
        expected = meta.pop(FINGERPRINT_KEY, None)
        if expected is not None:  # (checkpoints written before checksums existed have none)
            got = fingerprint(state)
            bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
            if bad:
                raise CheckpointError(
                    f"checkpoint {self.path(step)} is corrupted: {len(bad)} of {len(got)} arrays differ from the "
                    f"checksums written when it was saved ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        return state, meta

    def restore_meta(self, step: int) -> dict:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"] or {})
        meta.pop(FINGERPRINT_KEY, None)
        return meta

    def restore_latest_good(self, abstract_state: Any, *, before: int | None = None, set_aside: bool = False
                            ) -> tuple[int, Any, dict] | None:
        """Newest checkpoint that restores; unusable ones are logged by path and skipped, and with
        ``set_aside`` (a run resuming, which will save those steps again) renamed ``<step>.unusable``.

        None if there is no checkpoint at all; CheckpointError if there are some but none is usable.
        """
        errors, unusable = [], []
        for step in reversed(self.all_steps()):
            if before is not None and step >= before:
                continue
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:  # (on every process alike)
                log.error("%s; trying the previous one", e)
                errors.append(str(e))
                unusable.append(step)
                continue
            if set_aside:
                self._set_aside(unusable)
            return step, state, meta
        if errors:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(errors)
                                  + ". Move the directory away to start the run afresh")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames checkpoints ``<step>`` to ``<step>.unusable[-N]``, which orbax does not take for a step.
        Process 0 renames; every process waits for it."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target, n = self.path(step) + ".unusable", 1
                while os.path.exists(target):
                    n += 1
                    target = f"{self.path(step)}.unusable-{n}"
                os.rename(self.path(step), target)
                log.warning("moved the unusable checkpoint %s to %s", self.path(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("ladic_jax.checkpoint.set_aside")
        self._mgr.reload()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._mgr.close()
            except Exception:  # noqa: BLE001 - orbax re-raises the failure that wait() reports
                pass

    def close(self) -> None:
        """Waits for the last save (raising CheckpointError if it failed) and releases orbax's threads."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        self._mgr.close()


def run_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in WORKDIR/checkpoints ([] without any)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    ck = Checkpointer(path, read_only=True)
    try:
        return ck.all_steps()
    finally:
        ck.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, as restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
