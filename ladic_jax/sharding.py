"""Device mesh and parameter/batch shardings, described as data in the config.

The mesh has three named axes (``data``, ``fsdp``, ``model``). Parameters are placed by a list of
``(regex, rule)`` pairs matched against the parameter's path (``"diffuser/block_0/mlp/fc1/kernel"``); the
first match wins:

* ``"replicate"``: a full copy on every device.
* ``"fsdp"``: the largest dimension divisible by the ``fsdp`` axis size is split over it (replicated
  if no dimension divides).

Batches are split along their leading axis over ``("data", "fsdp")``: with FSDP every device still sees
its own share of the examples.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ladic_jax import config as config_lib

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
RULES = ("replicate", "fsdp")


def mesh_shape(mesh_cfg: Sequence[Sequence[Any]], num_devices: int) -> tuple[int, ...]:
    """Resolves ``[("data", -1), ("fsdp", 2), ("model", 1)]`` into sizes for AXES.

    At most one axis may be -1 (takes the remaining devices); the product must equal num_devices.
    """
    sizes = {}
    for entry in mesh_cfg:
        if len(entry) != 2:
            raise ValueError(f"config.mesh entries must be (axis, size) pairs, got {entry!r}")
        name, size = entry
        if name not in AXES:
            raise ValueError(f"config.mesh: unknown axis {name!r}; axes are {AXES}")
        if name in sizes:
            raise ValueError(f"config.mesh: axis {name!r} given twice")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh: size of axis {name!r} must be a positive int or -1, got {size!r}")
        sizes[name] = size
    for name in AXES:
        sizes.setdefault(name, 1)
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh: {num_devices} devices cannot be split with fixed axis sizes of product {fixed}")
        sizes[free[0]] = num_devices // fixed
    shape = tuple(sizes[n] for n in AXES)
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"config.mesh: axis sizes {dict(zip(AXES, shape))} need {int(np.prod(shape))} devices, "
                         f"but {num_devices} are available")
    return shape


def make_mesh(mesh_cfg: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: XLA propagates shardings from the inputs and the parameter rules (GSPMD).
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def path_str(path: Iterable[Any]) -> str:
    """'a/b/c' for a pytree key path (dict keys, attributes or sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    if fsdp_size == 1:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def param_specs(params: Any, mesh: Mesh, rules: Sequence[Sequence[str]]) -> Any:
    """PartitionSpecs for a pytree of (abstract) arrays following the regex rules."""
    compiled = []
    for entry in rules:
        if len(entry) != 2 or entry[1] not in RULES:
            raise ValueError(f"config.sharding_rules: each rule is (regex, one of {RULES}), got {entry!r}")
        compiled.append((re.compile(entry[0]), entry[1]))
    fsdp_size = mesh.shape["fsdp"]

    def spec_for(path, leaf):
        name = path_str(path)
        for regex, rule in compiled:
            if regex.search(name):
                return P() if rule == "replicate" else _fsdp_spec(leaf.shape, fsdp_size)
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Sequence[str]]) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis split over the data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Forms global jax.Arrays from each process's local share of a batch (numeric fields only).

    With several processes, process p's rows land on its own devices and the global batch is the
    processes' local batches one after the other (the mesh orders devices by process).
    """
    out = {}
    for k, v in local.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process.

    Arrays spanning other processes' devices are gathered (a collective: every process must call this).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def over_processes(values, reduce) -> np.ndarray:
    """``reduce`` (np.min, np.max, np.sum) over the processes of a host array of the same shape on each,
    elementwise (a collective in a multi-process run)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(values))
    return reduce(gathered.reshape(-1, *values.shape), axis=0)


def every_process(flag: bool) -> bool:
    """True only if ``flag`` holds on every process (a collective in a multi-process run)."""
    return bool(over_processes(np.int32(flag), np.min))


def any_process(flag: bool) -> bool:
    """True if ``flag`` holds on at least one process (a collective in a multi-process run)."""
    return bool(over_processes(np.int32(flag), np.max))


def batch_split_problem(field: str, batch_size: int, data_parallel: int) -> str | None:
    """What is wrong with ``config.input.<field>`` if it does not split over ``data_parallel`` devices."""
    if batch_size % data_parallel == 0:
        return None
    nearest = sorted({max(data_parallel, batch_size // data_parallel * data_parallel),
                      -(-batch_size // data_parallel) * data_parallel})
    return (f"config.input.{field}={batch_size} does not split over the {data_parallel} data-parallel devices: "
            f"use a multiple of {data_parallel}, e.g. {' or '.join(map(str, nearest))}")


@config_lib.register_validator("mesh")
def validate_mesh(config, num_devices: int | None = None, *, batches: bool = True) -> None:
    """Checks config.mesh against num_devices (default: all of JAX's), config.sharding_rules and (with
    ``batches``) that the batch sizes split over the mesh's data-parallel axes."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    try:
        shape = dict(zip(AXES, mesh_shape(config.mesh, num_devices)))
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    for field in ("batch_size", "eval_batch_size") if batches and "input" in config else ():
        problem = batch_split_problem(field, config.input[field], shape["data"] * shape["fsdp"])
        if problem:
            raise config_lib.ConfigError(f"{problem} (mesh {shape} on {num_devices} devices)")
    for i, entry in enumerate(config.get("sharding_rules", [])):
        if len(entry) != 2 or entry[1] not in RULES:
            raise config_lib.ConfigError(
                f"config.sharding_rules[{i}] must be (regex, one of {RULES}), got {entry!r}")
        try:
            re.compile(entry[0])
        except re.error as e:
            raise config_lib.ConfigError(f"config.sharding_rules[{i}]: bad regex {entry[0]!r}: {e}") from None
