"""One of two processes saving or restoring a small state sharded over both, for test_checkpoint.py.

  python two_process_checkpoint.py PORT PROCESS_ID save DIR      saves steps 1 and 2
  python two_process_checkpoint.py PORT PROCESS_ID restore DIR   restore_latest_good, set_aside; prints
                                                                 "RESTORED <step> <fingerprint matches>"

Each process has one CPU device; the array "w" is split over the two, so that each process reads (and
writes) only its own half: damaging one process's files fails the read on that process alone.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ladic_jax.checkpoint import Checkpointer, abstract_like, fingerprint


def state(seed: int, mesh) -> dict:
    full = np.random.default_rng(seed).normal(size=(64, 32)).astype(np.float32)
    split = NamedSharding(mesh, P("data"))
    w = jax.make_array_from_callback(full.shape, split, lambda index: full[index])
    step = jax.jit(lambda: jnp.int32(seed), out_shardings=NamedSharding(mesh, P()))()
    return {"step": step, "params": {"w": w}}


def main():
    port, pid, mode, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    mesh = jax.make_mesh((2,), ("data",))
    ck = Checkpointer(directory, keep=5)
    if mode == "save":
        for step in (1, 2):
            ck.save(step, state(step, mesh), {"step": step})
    else:
        step, restored, _ = ck.restore_latest_good(abstract_like(state(0, mesh)), set_aside=True)
        print("RESTORED", step, fingerprint(restored) == fingerprint(state(step, mesh)), flush=True)
    ck.close()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
