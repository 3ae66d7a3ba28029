"""Multi-process runs: ``jax.distributed.initialize`` from ``config.distributed`` and the environment.

One process per host (or, for tests, several on one machine) runs the same program; each reads its own
slice of the data, and they meet in the collectives of the jitted steps, in orbax's checkpoint barriers
and in the evaluator's gathers. The entry point (``ladic-train``; a script calling
``trainer.train_and_evaluate``) calls ``initialize(config)`` once, before any other JAX use.

Where the settings come from, per field (the config wins over the environment):

=====================  ==========================  =================================================
config.distributed     environment                 meaning
=====================  ==========================  =================================================
coordinator_address    JAX_COORDINATOR_ADDRESS     ``host:port`` of process 0's coordination service
num_processes          JAX_NUM_PROCESSES           number of processes of the run
process_id             JAX_PROCESS_ID              this process, in ``[0, num_processes)``
local_device_ids       JAX_LOCAL_DEVICE_IDS        devices this process uses (read by JAX itself)
auto_detect            -                           let JAX detect the cluster (Cloud TPU pods, SLURM,
                                                   Open MPI, Kubernetes) and fill in what is unset
initialization_timeout -                           seconds to wait for all processes to connect
=====================  ==========================  =================================================

With none of them set the run is a single process and nothing is initialised. ``JAX_COORDINATOR_ADDRESS``
and ``JAX_LOCAL_DEVICE_IDS`` are JAX's own variables; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are this
project's. On CPU the cross-process collectives use gloo (JAX's default, ``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from ladic_jax import config as config_lib

log = logging.getLogger(__name__)

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def config_section() -> ml_collections.ConfigDict:
    """``config.distributed`` with its defaults: everything unset (a single process unless the environment
    says otherwise)."""
    return ml_collections.ConfigDict({
        "coordinator_address": config_dict.placeholder(str),
        "num_processes": config_dict.placeholder(int),
        "process_id": config_dict.placeholder(int),
        "local_device_ids": config_dict.placeholder(tuple),
        "auto_detect": False,
        "initialization_timeout": 300,
    })


def _check_address(value: Any, field: str) -> None:
    ok = isinstance(value, str) and re.fullmatch(r"\S+:(\d+)", value.strip()) is not None
    if ok:
        ok = 0 < int(value.strip().rsplit(":", 1)[1]) < 65536
    config_lib.check(ok, field, f"must be 'host:port' with a port in 1..65535, got {value!r}")


@config_lib.register_validator("distributed")
def validate(config) -> None:
    """Types and ranges of config.distributed (needs no JAX backend: runs before initialisation)."""
    d = config.distributed
    known = set(config_section().keys())
    unknown = sorted(set(d.keys()) - known)
    config_lib.check(not unknown, "config.distributed", f"has unknown field(s) {unknown}; known: {sorted(known)}")
    if d.get("coordinator_address") is not None:
        _check_address(d.coordinator_address, "config.distributed.coordinator_address")
    n = d.get("num_processes")
    if n is not None:
        config_lib.check(config_lib.is_int(n) and n >= 1, "config.distributed.num_processes", f"must be an integer >= 1, got {n!r}")
    i = d.get("process_id")
    if i is not None:
        config_lib.check(config_lib.is_int(i) and i >= 0 and (n is None or i < n), "config.distributed.process_id",
                         f"must be an integer in [0, num_processes={n}), got {i!r}")
    ids = d.get("local_device_ids")
    if ids is not None:
        config_lib.check(isinstance(ids, (tuple, list)) and all(config_lib.is_int(x) and x >= 0 for x in ids),
                         "config.distributed.local_device_ids", f"must be a tuple of device ids >= 0, got {ids!r}")
    config_lib.check(isinstance(d.get("auto_detect", False), bool), "config.distributed.auto_detect",
                     f"must be a bool, got {d.get('auto_detect')!r}")
    config_lib.require_positive(config, "distributed.initialization_timeout", integer=True)


def settings(config, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The arguments for ``jax.distributed.initialize``, or None for a single-process run.

    Raises ``ConfigError`` naming the field (and its environment variable) that is missing or malformed.
    """
    environ = os.environ if environ is None else environ
    section = config.get("distributed") or config_section()
    if "distributed" in config:
        validate(config)
    out: dict[str, Any] = {}
    for key, var in ENV.items():
        value = section.get(key)
        if value is None and environ.get(var, "").strip():
            raw = environ[var].strip()
            if key == "coordinator_address":
                _check_address(raw, f"environment variable {var}")
                value = raw
            else:
                config_lib.check(raw.isdigit(), f"environment variable {var}", f"must be an integer, got {raw!r}")
                value = int(raw)
        out[key] = value
    n, i = out["num_processes"], out["process_id"]
    if n is not None and i is not None and not 0 <= i < n:
        raise config_lib.ConfigError(f"process id {i} (config.distributed.process_id or {ENV['process_id']}) must "
                                     f"be in [0, {n}) (config.distributed.num_processes or {ENV['num_processes']})")
    auto = bool(section.get("auto_detect", False))
    if not auto:
        if out["coordinator_address"] is None and (n is None or n == 1) and i in (None, 0):
            return None  # a single process
        missing = [k for k, v in out.items() if v is None]
        if missing:
            names = ", ".join(f"config.distributed.{k} (or {ENV[k]})" for k in missing)
            raise config_lib.ConfigError(
                f"a multi-process run needs coordinator_address, num_processes and process_id; not set: {names}. "
                "Set config.distributed.auto_detect=True to let JAX detect a TPU pod / SLURM / Open MPI cluster")
    ids = section.get("local_device_ids")
    out["local_device_ids"] = list(ids) if ids is not None else None
    out["initialization_timeout"] = int(section.get("initialization_timeout", 300))
    return out


def initialize(config, environ: Mapping[str, str] | None = None) -> bool:
    """Connects this process to the others (once; later calls only check). True for a multi-process run.

    Must come before any other JAX use in the process: JAX refuses to initialise once its backend is up.
    """
    args = settings(config, environ)
    import jax  # Deferred: settings() and validate() must work without touching the JAX backend.

    if jax.distributed.is_initialized():
        n = args["num_processes"] if args else None
        if n is not None and jax.process_count() != n:
            raise config_lib.ConfigError(f"config.distributed.num_processes={n} but JAX was initialised with "
                                         f"{jax.process_count()} processes")
        return True
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:
        if "before" in str(e):
            raise RuntimeError(
                f"a multi-process run was requested (config.distributed / {', '.join(ENV.values())}) but JAX is "
                "already in use in this process: call ladic_jax.distributed.initialize(config) before any other "
                f"JAX call ({e})") from None
        raise
    # A first collective now, while the processes are together: on CPU, gloo gives them only 30 s to meet
    # at the first collective over a set of devices, less than start-up and compilation can differ by
    # under load; later collectives over the same devices wait as long as needed.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ladic_jax.distributed.initialize")
    log.info("process %d of %d (coordinator %s); local devices %s", jax.process_index(), jax.process_count(),
             args["coordinator_address"], jax.local_devices())
    return True

