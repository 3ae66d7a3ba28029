"""Ahead-of-time fit of a run on a TPU topology, compiled on this host (no TPU needed).

    report = aot.check(config, "v5e:4x4", config_name="configs/ladic_coco.py")
    print(aot.format_report(report))      # report.fits: every program fits in HBM

libtpu (the ``tpu`` extra: ``pip install 'ladic_jax[tpu]'``) describes the chips of a topology
(``jax.experimental.topologies``). The run's mesh is laid over them (``trainer.skeleton(config, devices)``)
and the real programs are lowered with abstract arguments carrying their ``NamedSharding``s and compiled
for that TPU:

- the **train step** (``trainer.make_train_step``) on a ``config.input.batch_size`` batch;
- the **sampler** (``sampler.make_sample_fn``, the evaluator's loop at ``config.sampler.steps``) on a
  ``config.input.eval_batch_size`` batch, with every parameter an argument (the evaluator holds them all).

XLA's ``memory_analysis()`` gives what each chip holds (arguments, outputs, temporaries, generated code;
donated inputs are aliased to outputs and counted once) and ``cost_analysis()`` the flops each chip runs.
XLA itself refuses to compile a program that exceeds the chip's HBM (``RESOURCE_EXHAUSTED``); that is
reported as not fitting, with XLA's figures. Two counting rules of XLA's cost analysis matter here: a
loop body is counted once, so the sampler's flops add (loop steps - 1) times those of one compiled
denoising step (``ladic_jax/cost.py``, shared with scripts/benchmark.py); and a conditional counts its costlier branch (an upper bound where a step branches at
random).

Only shapes are needed, so nothing is downloaded or read but the config: a config trained for a number
of epochs is given ``total_steps`` (the schedule's length changes no shape), and a tokenizer that is not
on this machine is replaced by the packaged MiniLM one (only special-token ids enter the programs);
both are listed in ``report.notes``. Pretrained encoders must have their sizes spelled out in the config
(see configs/ladic_coco.py) unless their config.json is at hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile
from typing import Any, Iterator, Sequence

import jax

from ladic_jax import cost as cost_lib
from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding
from ladic_jax import trainer
from ladic_jax.encoders import loading

GiB = 2 ** 30
PROGRAMS = ("train_step", "sampler")
#: total_steps given to a config that counts its training in epochs (that needs the dataset's size).
PLACEHOLDER_STEPS = 10_000


class AotError(ValueError):
    """A topology, config or environment that the check cannot work with; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. ``hbm_bytes``: per chip as Cloud TPU documents it (v5p: "95 GB", which jax's own
    chip table, jax/_src/pallas/mosaic/tpu_info.py, gives as 103e9 B = 96 GiB). ``xla_limit_bytes``: what
    XLA lets one program use on it, the "available HBM" of its out-of-memory error (libtpu 0.0.42.1).
    ``chip_config``: "megacore" shows a chip's two TensorCores as one device, as JAX does on v4 and v5p VMs."""
    name: str
    hbm_bytes: int
    xla_limit_bytes: int
    chip_config: str = "default"
    peak_flops: float = 0.0       # bf16 matmul FLOP/s per chip (Cloud TPU's published figure)
    hbm_bandwidth: float = 0.0    # bytes/s per chip (published)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, int(30.75 * GiB), "megacore", 275e12, 1200e9),
    "v5e": Chip("v5e", 16 * GiB, int(15.75 * GiB), peak_flops=197e12, hbm_bandwidth=819e9),
    "v5p": Chip("v5p", 96 * GiB, int(95.74 * GiB), "megacore", 459e12, 2765e9),
    "v6e": Chip("v6e", 32 * GiB, int(31.25 * GiB), peak_flops=918e12, hbm_bandwidth=1640e9),
}
_TOPOLOGY = re.compile(r"^(?P<chip>[a-z0-9]+):(?P<dims>\d+(?:x\d+){1,2})$")
_HOST_BOUNDS = (2, 2, 1)  # libtpu's default chips per host


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


# ---------------------------------------------------------------------------------------------- topology


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5e:4x4"`` -> (the v5e Chip, (4, 4)). Raises AotError naming the topology."""
    m = _TOPOLOGY.match(topology.strip())
    if not m:
        raise AotError(f"topology {topology!r}: expected GENERATION:AxB or GENERATION:AxBxC with GENERATION one "
                       f"of {sorted(CHIPS)}, e.g. v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x2")
    if m["chip"] not in CHIPS:
        raise AotError(f"topology {topology!r}: unknown TPU generation {m['chip']!r}; known: {sorted(CHIPS)}")
    dims = tuple(int(d) for d in m["dims"].split("x"))
    if min(dims) < 1:
        raise AotError(f"topology {topology!r}: every dimension must be at least 1")
    return CHIPS[m["chip"]], dims


def topology_devices(topology: str) -> tuple[Chip, list[jax.Device]]:
    """The compile-only TPU devices of a topology (one per chip), from libtpu; no TPU is needed."""
    chip, dims = parse_topology(topology)
    if not libtpu_available():
        raise AotError(f"topology {topology!r}: libtpu is not installed; install the tpu extra: "
                       "pip install 'ladic_jax[tpu]' (jax[tpu] at the installed jax's version)")
    # libtpu takes /tmp/libtpu_lockfile when it loads, so that two processes never drive the same chips;
    # compiling opens no chip, so two checks (or a check beside a test run) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"chip_config_name": chip.chip_config}
    full = tuple(dims) + (1,) * (3 - len(dims))
    if any(d < b for d, b in zip(full, _HOST_BOUNDS)):  # a slice smaller than one host, e.g. v5e:1x1
        kwargs["chips_per_host_bounds"] = tuple(min(d, b) for d, b in zip(full, _HOST_BOUNDS))
    try:
        # On a machine without TPUs, libtpu's first use warns on stderr that it finds no TPU hosts:
        # kept out of the way unless the topology fails.
        with captured_stderr() as said:
            desc = topologies.get_topology_desc(topology_name=topology.strip(), platform="tpu", **kwargs)
    except Exception as e:  # libtpu reports bad layouts as JaxRuntimeError INVALID_ARGUMENT
        extra = f" (libtpu printed: {said[0].strip()})" if said and said[0].strip() else ""
        if "lockfile" in str(e):
            raise AotError(f"topology {topology!r}: another process holds libtpu's lock file "
                           f"(/tmp/libtpu_lockfile) and ALLOW_MULTIPLE_LIBTPU_LOAD="
                           f"{os.environ.get('ALLOW_MULTIPLE_LIBTPU_LOAD')!r} forbids a second load: "
                           "unset it or wait for that process") from e
        raise AotError(f"topology {topology!r}: libtpu cannot describe it: {e}{extra}") from e
    return chip, list(desc.devices)


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collects what C++ libraries write to file descriptor 2 (libtpu warns on a machine without TPUs that
    it cannot find TPU hosts); the text is in the yielded list afterwards."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip of one compiled program (``Compiled.memory_analysis()``)."""
    arguments: int
    outputs: int
    aliased: int          # outputs written into donated arguments: counted once
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, m.generated_code_size_in_bytes)


@dataclasses.dataclass
class ProgramFit:
    """One program on one topology: its figures, or why it was not compiled / does not fit."""
    name: str
    batch_size: int                 # global
    limit_bytes: int                # what one chip's program may use
    memory: Memory | None = None
    flops: float | None = None      # per chip per call
    bytes_accessed: float | None = None  # per chip per call (XLA's estimate)
    resident_bytes: int = 0         # also held in HBM while it runs (the optimizer state, for the sampler)
    needed_bytes: int | None = None  # XLA's own figure when it refused to compile
    problem: str | None = None
    detail: str = ""                # e.g. "30 steps"

    @property
    def total_bytes(self) -> int | None:
        if self.memory is not None:
            return self.memory.total + self.resident_bytes
        return self.needed_bytes

    @property
    def fits(self) -> bool:
        return self.problem is None and self.total_bytes is not None and self.total_bytes <= self.limit_bytes

    def roofline_seconds(self, chip: Chip) -> float | None:
        """An estimate of one call's time: the larger of flops at the chip's peak and bytes at its HBM
        bandwidth (no overlap lost, no communication counted: a lower bound on the real time)."""
        if not self.flops or self.bytes_accessed is None:
            return None
        return max(self.flops / chip.peak_flops, self.bytes_accessed / chip.hbm_bandwidth)

    @property
    def over_bytes(self) -> int | None:
        total = self.total_bytes
        return None if total is None else max(0, total - self.limit_bytes)


@dataclasses.dataclass
class Report:
    config_name: str
    topology: str
    chip: Chip
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    state_bytes: int         # params + optimizer state + step + rng per chip (logical, from the shardings)
    programs: list[ProgramFit]
    notes: list[str]
    train_steps: int | None = None     # the run's length in steps (from its epochs and the dataset's known size)
    train_detail: str = ""
    eval_images: int | None = None     # images of the evaluation split, where its size is known

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def estimates(self) -> list[str]:
        """Times from the roofline of each program: training the run and captioning its evaluation split."""
        out = []
        by_name = {p.name: p for p in self.programs}
        train, sampler = by_name.get("train step"), by_name.get("sampler")
        step_s = train.roofline_seconds(self.chip) if train else None
        if step_s and self.train_steps:
            out.append(f"training: {self.train_steps:,} steps ({self.train_detail}) x {step_s:.3g} s = "
                       f"{_duration(self.train_steps * step_s)}")
        call_s = sampler.roofline_seconds(self.chip) if sampler else None
        if call_s and self.eval_images:
            calls = math.ceil(self.eval_images / sampler.batch_size)
            out.append(f"captioning the {self.eval_images:,} evaluation images: {calls} call(s) of "
                       f"{sampler.batch_size} ({sampler.detail}) x {call_s:.3g} s = {_duration(calls * call_s)}")
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p, pd in zip(self.programs, d["programs"]):
            pd.update(total_bytes=p.total_bytes, fits=p.fits, over_bytes=p.over_bytes)
        d["fits"] = self.fits
        return d


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (logical, no padding)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


_OOM = re.compile(r"required for .*?\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def compile_program(jitted, args, fit: ProgramFit):
    """Lowers and compiles into ``fit``; returns the compiled program, or None when XLA ran out of HBM."""
    try:
        return jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        m = _OOM.search(text)
        if m:  # XLA's own figures: what the program needs and what it may use
            fit.needed_bytes = int(float(m[1]) * _UNITS[m[2]])
            fit.limit_bytes = int(float(m[3]) * _UNITS[m[4]])
        fit.problem = f"XLA ran out of HBM compiling it: {text.strip().splitlines()[0]}"
        return None


# ---------------------------------------------------------------------------------------------- the check


def offline_config(config) -> tuple[Any, list[str]]:
    """A copy of config that builds without files other than its own (see the module docstring)."""
    cfg = config.copy_and_resolve_references()
    notes = []
    with cfg.unlocked():
        if not cfg.get("total_steps"):
            cfg.total_steps = PLACEHOLDER_STEPS
            notes.append(f"training length in epochs needs the dataset's size: compiled with total_steps="
                         f"{PLACEHOLDER_STEPS} (the schedule's length changes no shape)")
        try:  # a local directory or the HF cache, never the network
            cfg.input.tokenizer = str(loading.resolve_directory(cfg.input.tokenizer))
        except (FileNotFoundError, ValueError):
            notes.append(f"tokenizer {cfg.input.tokenizer!r} is not on this machine: the packaged MiniLM "
                         "tokenizer stands in (only special-token ids enter the programs)")
            cfg.input.tokenizer = "minilm"
    return cfg, notes


def _batch(config, batch_size: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, len(v.shape)))
            for k, v in trainer.dummy_batch(config, batch_size).items()}


def _batch_problem(field: str, batch_size: int, mesh, topology: str) -> str | None:
    problem = sharding.batch_split_problem(field, batch_size, sharding.data_parallel_size(mesh))
    return problem and f"{problem} (mesh {dict(mesh.shape)} of {topology}; the run would fail the same way)"


def _too_big_to_compile(fit: ProgramFit, held: int, what: str) -> bool:
    """True (and the fit says why) when what the program must hold exceeds the limit before any compiling."""
    if held <= fit.limit_bytes:
        return False
    fit.needed_bytes = held
    fit.problem = f"{what} alone need {_bytes(held)} per chip (not compiled)"
    return True


def _train_step(sk, config, topology, limit) -> ProgramFit:
    bsz = int(config.input.batch_size)
    fit = ProgramFit("train step", bsz, limit)
    fit.problem = _batch_problem("batch_size", bsz, sk.mesh, topology)
    if fit.problem:
        return fit
    batch = _batch(config, bsz, sk.mesh)
    if _too_big_to_compile(fit, per_device_bytes((sk.abstract_state, batch)),
                           "the train state (parameters, optimizer state) and the batch"):
        return fit
    step = trainer.make_train_step(sk)
    compiled = compile_program(step, (sk.abstract_state, batch), fit)
    if compiled is not None:
        fit.memory, fit.flops = Memory.of(compiled), cost_lib.flops(compiled)
        fit.bytes_accessed = cost_lib.bytes_accessed(compiled)
    return fit


def _sampler(sk, config, topology, limit) -> ProgramFit:
    from ladic_jax.evaluation.evaluator import sampler_config

    scfg = sampler_config(config)
    bsz = int(config.input.eval_batch_size)
    fit = ProgramFit("sampler", bsz, limit, detail=f"{int(scfg.steps)} steps")
    if config.eval.get("every_steps") or config.eval.get("at_end"):
        # The training process evaluates with its optimizer state still in HBM.
        fit.resident_bytes = per_device_bytes(sk.abstract_state["opt_state"])
    fit.problem = _batch_problem("eval_batch_size", bsz, sk.mesh, topology)
    if fit.problem:
        return fit
    rep = sharding.replicated(sk.mesh)
    params = sk.abstract_state["params"]
    batch = _batch(config, bsz, sk.mesh)
    if _too_big_to_compile(fit, per_device_bytes((params, batch)) + fit.resident_bytes,
                           "the parameters, the batch" + (" and the optimizer state" if fit.resident_bytes else "")):
        fit.resident_bytes = 0  # counted in needed_bytes
        return fit
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    fn = sampler_lib.make_sample_fn(sk.family, scfg, out_shardings=sharding.batch_sharding(sk.mesh, 2),
                                    keep_unused=True)
    compiled = compile_program(fn, (params, batch, rng), fit)
    if compiled is None:
        return fit
    fit.memory = Memory.of(compiled)
    # XLA counts the loop body once: cost.sampler_cost adds the other loop steps' flops.
    cost = cost_lib.sampler_cost(sk.family, scfg, params, batch, rng, mesh=sk.mesh, program=compiled,
                                 compile_fn=lambda f, a: compile_program(f, a, fit))
    fit.flops, fit.bytes_accessed = cost.total, cost.total_bytes
    return fit


def check(config, topology: str, *, config_name: str = "config",
          programs: Sequence[str] = PROGRAMS) -> Report:
    """Compiles ``programs`` (of PROGRAMS) of the run for ``topology``; see the module docstring."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise AotError(f"unknown program(s) {unknown}; known: {list(PROGRAMS)}")
    chip, devices = topology_devices(topology)
    per_chip = len({d.core_on_chip for d in devices})  # devices per chip (1 with the chip configs above)
    limit = chip.xla_limit_bytes // per_chip
    cfg, notes = offline_config(config)
    sk = trainer.skeleton(cfg, devices, check_batches=False)
    fits = []
    if "train_step" in programs:
        fits.append(_train_step(sk, cfg, topology, limit))
    if "sampler" in programs:
        fits.append(_sampler(sk, cfg, topology, limit))
    report = Report(config_name, topology, chip, len(devices), devices[0].device_kind, dict(sk.mesh.shape),
                    per_device_bytes(sk.abstract_state), fits, notes)
    _run_length(report, config)
    return report


def _run_length(report: Report, config) -> None:
    """The run's training steps and evaluation images, from the config and the datasets' known sizes."""
    from ladic_jax.data import datasets

    inp = config.input
    report.eval_images = datasets.known_size(inp.dataset, inp.eval_split)
    if config.get("total_steps"):
        report.train_steps, report.train_detail = int(config.total_steps), "config.total_steps"
        return
    images = datasets.known_size(inp.dataset, inp.train_split)
    epochs = config.get("num_epochs", 0)
    if images and epochs:
        report.train_steps = math.ceil(epochs * images / int(inp.batch_size))
        report.train_detail = f"{epochs} epochs of {images:,} images at batch {inp.batch_size}"


# ---------------------------------------------------------------------------------------------- output


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2 ** 20:.1f} MiB"


def _flop_text(f: float | None) -> str:
    if not f:
        return "-"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def format_report(report: Report) -> str:
    """The report as a text table, programs in columns, and a closing verdict line."""
    r, n = report, report.num_devices
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"AOT fit of {r.config_name} on {r.topology}: {n} x {r.device_kind}, mesh {mesh}",
             f"HBM per chip {_bytes(r.chip.hbm_bytes)}; XLA's limit per program {_bytes(r.programs[0].limit_bytes)}"
             if r.programs else f"HBM per chip {_bytes(r.chip.hbm_bytes)}",
             f"train state (params + optimizer) per chip: {_bytes(r.state_bytes)}", ""]
    rows: list[tuple[str, list[str]]] = []

    def mem(attr):
        return [_bytes(getattr(p.memory, attr)) if p.memory else "-" for p in r.programs]

    rows.append(("", [p.name + (f" ({p.detail})" if p.detail else "") for p in r.programs]))
    rows.append(("batch (global / per chip)", [f"{p.batch_size} / {p.batch_size / n:g}" for p in r.programs]))
    rows.append(("arguments", mem("arguments")))
    rows.append(("outputs", mem("outputs")))
    rows.append(("  aliased to arguments", mem("aliased")))
    rows.append(("temporaries", mem("temporaries")))
    rows.append(("generated code", mem("generated_code")))
    rows.append(("program total", [_bytes(p.memory.total) if p.memory else "-" for p in r.programs]))
    if any(p.resident_bytes for p in r.programs):
        rows.append(("+ optimizer state resident", [_bytes(p.resident_bytes) if p.resident_bytes else "-"
                                                    for p in r.programs]))
    rows.append(("total per chip", [_bytes(p.total_bytes) for p in r.programs]))
    rows.append(("of XLA's limit", [f"{100 * p.total_bytes / p.limit_bytes:.1f}%" if p.total_bytes else "-"
                                    for p in r.programs]))
    rows.append(("flops per chip per call", [_flop_text(p.flops) for p in r.programs]))
    rows.append((f"flops per call, {n} chips", [_flop_text(p.flops * n if p.flops else None) for p in r.programs]))
    rows.append(("flops per example", [_flop_text(p.flops * n / p.batch_size if p.flops else None)
                                       for p in r.programs]))
    rows.append(("bytes accessed per chip", [_bytes(int(p.bytes_accessed)) if p.bytes_accessed else "-"
                                             for p in r.programs]))
    rows.append(("est. seconds per call", [f"{s:.3g}" if (s := p.roofline_seconds(r.chip)) else "-"
                                           for p in r.programs]))
    rows.append(("fits", ["yes" if p.fits else f"NO (over by {_bytes(p.over_bytes)})"
                          if p.over_bytes else "NO" for p in r.programs]))
    width = max(len(k) for k, _ in rows)
    cols = [max(len(v[i]) for _, v in rows) for i in range(len(r.programs))]
    for k, vals in rows:
        lines.append(f"{k:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(vals, cols)))
    estimates = r.estimates()
    if any(p.roofline_seconds(r.chip) for p in r.programs):
        lines.append(f"estimates (roofline: the larger of flops at {r.chip.peak_flops / 1e12:g} TFLOP/s and bytes "
                     f"at {r.chip.hbm_bandwidth / 1e9:g} GB/s per {r.chip.name} chip, published bf16 figures; JAX "
                     f"runs float32 matmuls on TPU as bf16 passes by default; no communication or imperfect "
                     f"overlap counted, so real times are longer):")
        lines.extend(f"  {e}" for e in estimates)
    for note in r.notes:
        lines.append(f"note: {note}")
    for p in r.programs:
        if p.problem:
            lines.append(f"problem ({p.name}): {p.problem}")
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: Report) -> str:
    """One line: fits, or what does not fit on which topology and by how much."""
    r = report
    if r.fits:
        worst = max((p.total_bytes or 0) / p.limit_bytes for p in r.programs) if r.programs else 0.0
        return f"FITS: {r.config_name} on {r.topology} (largest program uses {100 * worst:.1f}% of XLA's limit)"
    parts = []
    for p in r.programs:
        if p.fits:
            continue
        if p.over_bytes:
            parts.append(f"the {p.name} needs {_bytes(p.total_bytes)} per chip, {_bytes(p.over_bytes)} over "
                         f"the {_bytes(p.limit_bytes)} XLA allows on a {r.chip.name} chip")
        else:
            parts.append(f"the {p.name} could not be checked: {p.problem}")
    return f"DOES NOT FIT: {r.config_name} on {r.topology}: " + "; ".join(parts)
