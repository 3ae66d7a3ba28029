"""Runs ladic-train with a fault injected into orbax's save, for tests/training/test_preemption.py.

  python fault_injection.py hang-save-after STEP [ladic-train flags]
      The first checkpoint save of a step > STEP writes everything, then blocks just before its final
      rename (tmp dir -> <step>) and prints "FAULT hang <step> <tmp dir>": the test kills the process there.
  python fault_injection.py enospc-after STEP [ladic-train flags]
      Saves of steps > STEP fail in the background with OSError(ENOSPC), as on a full disk (used where a
      small tmpfs cannot be mounted).

Everything else is the real CLI in a real process.
"""

import errno
import functools
import sys
import time

from orbax.checkpoint._src.path import atomicity

from ladic_jax.cli import train as train_cli


def _step_of(path) -> int | None:
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return int(name) if name.isdigit() else None


def main():
    mode, after, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    original = atomicity.AtomicRenameTemporaryPath.finalize

    @functools.wraps(original)
    async def finalize(self, *args, **kwargs):
        step = _step_of(self.get_final())
        if step is not None and step > after:
            if mode == "hang-save-after":
                print(f"FAULT hang {step} {self.get()}", flush=True)
                time.sleep(3600)
            elif mode == "enospc-after":
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(self.get()))
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    train_cli.main(argv)


if __name__ == "__main__":
    main()
