"""Checkpoints of a run: orbax CheckpointManager over the train state plus a JSON record.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the pytree of arrays (params,
optimizer state, step, rng), restored directly onto the target shardings; ``meta`` is a small JSON
dict (input position, config, notes). Saves are asynchronous; ``wait()`` blocks until the last one is
on disk. A checkpoint that fails to restore is reported by path and the previous one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings given by ``abstract_state`` (ShapeDtypeStructs)."""
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"] or {})

    def restore_meta(self, step: int) -> dict:
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def restore_latest_good(self, abstract_state: Any, *, before: int | None = None
                            ) -> tuple[int, Any, dict] | None:
        """Newest checkpoint that restores; corrupt ones are logged by path and skipped."""
        for step in reversed(self.all_steps()):
            if before is not None and step >= before:
                continue
            try:
                state, meta = self.restore(step, abstract_state)
                return step, state, meta
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                log.error("checkpoint %s is unreadable (%s: %s); trying the previous one",
                          os.path.join(self.directory, str(step)), type(e).__name__, e)
        return None

    def close(self) -> None:
        self._mgr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, as restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
