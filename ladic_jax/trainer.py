"""The one trainer for every model family: ``train_and_evaluate(config, workdir)``.

Order of events:
  validate config -> family -> mesh -> abstract params (eval_shape) -> shardings -> jit(init) on the
  shardings (never whole on one device) -> optimizer -> resume from the workdir's newest good
  checkpoint, or else pretrained weights + data-dependent set-up (family.prepare) -> loop of jitted,
  donated train steps with logging, checkpoints, periodic evaluation -> final checkpoint + evaluation.

Stops cleanly on SIGTERM/SIGINT (checkpoint at the next step boundary, the same step on every
process, exit status 0); refuses to continue past a non-finite loss or gradient norm, keeping the last
good checkpoint intact; and stops with a CheckpointError naming the path when a checkpoint cannot be
written (e.g. disk full) rather than train on without checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ladic_jax import checkpoint as ckpt_lib
from ladic_jax import config as config_lib
from ladic_jax import distributed
from ladic_jax import feature_cache
from ladic_jax import optim
from ladic_jax import sharding
from ladic_jax.data import pipeline
from ladic_jax.evaluation import report
from ladic_jax.evaluation.evaluator import Evaluator
from ladic_jax.families.base import STATE_UPDATES, Family, get_family
from ladic_jax.metric_writer import MetricWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


@config_lib.register_validator("checkpoint")
def _validate_run(config) -> None:
    c = config_lib
    c.check(bool(config.get("total_steps")) or bool(config.get("num_epochs")), "config.total_steps",
            "or config.num_epochs must be set to a positive value")
    if config.get("total_steps"):
        c.require_positive(config, "total_steps", integer=True)
    else:
        c.require_positive(config, "num_epochs")
    c.require_positive(config, "log_every", integer=True)
    if config.get("stop_at_step"):  # optional: 0 / absent = run to the end
        c.require_positive(config, "stop_at_step", integer=True)
    c.require_positive(config, "checkpoint.every_steps", integer=True)
    c.require_positive(config, "checkpoint.keep", integer=True)
    c.require_nonnegative(config, "eval.every_steps", integer=True)
    c.require_nonnegative(config, "eval.limit", integer=True)
    for i, n in enumerate(config.eval.sampling_steps):
        c.check(isinstance(n, int) and n > 0, f"config.eval.sampling_steps[{i}]", f"must be a positive int, got {n!r}")
    for name, kind, what in (("clip", str, '"" (none), "self" (the model\'s own) or a CLIP directory / hub id'),
                             ("clip_prompt", str, "a str"), ("clip_model_metrics", bool, "a bool")):
        value = config.eval.get(name, kind())
        c.check(isinstance(value, kind), f"config.eval.{name}", f"must be {what}, got {value!r}")


def total_steps(config) -> int:
    """Training length from config.total_steps, or config.num_epochs over the training split."""
    if config.get("total_steps"):
        return int(config.total_steps)
    n = pipeline.num_eval_examples(config.input, config.input.train_split)
    return int(math.ceil(config.num_epochs * n / config.input.batch_size))


def dummy_batch(config, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    s, L = config.input.image_size, config.input.max_length
    return {
        "image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((batch_size, L), jnp.int32),
        "token_mask": jax.ShapeDtypeStruct((batch_size, L), jnp.int32),
    }


def _merge(params, replacements: dict[str, np.ndarray], shardings, what: str):
    """Puts host arrays into the param tree by path, onto the param's sharding. Strict on paths/shapes."""
    unused = set(replacements)

    def put(path, leaf, shard):
        name = sharding.path_str(path)
        if name not in replacements:
            return leaf
        unused.discard(name)
        value = np.asarray(replacements[name])
        if value.shape != leaf.shape:
            raise ValueError(f"{what}: tensor for {name} has shape {value.shape}, the model expects {leaf.shape}")
        return jax.device_put(value.astype(leaf.dtype), shard)

    out = jax.tree_util.tree_map_with_path(put, params, shardings)
    if unused:
        raise ValueError(f"{what}: no model parameter at {sorted(unused)}")
    return out


@dataclasses.dataclass
class Skeleton:
    """The shapes and shardings of a run's train state, before any array exists."""
    family: Family
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    init_fn: Any
    abstract_state: Any     # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    frozen: Any             # bools over params: True where config.optim.frozen matches


def skeleton(config, devices: Sequence[jax.Device] | None = None, *, check_batches: bool = True) -> Skeleton:
    """The run's skeleton on a mesh over ``devices`` (default: all of ``jax.devices()``; ``ladic_jax.aot``
    passes the compile-only devices of a TPU topology, and reports batch sizes that do not split over
    them per program instead of ``check_batches`` raising)."""
    devices = jax.devices() if devices is None else list(devices)
    config_lib.validate(config, exclude=("mesh",))
    sharding.validate_mesh(config, len(devices), batches=check_batches)
    family = get_family(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    steps = total_steps(config)
    rules = [tuple(r) for r in config.sharding_rules]
    init_fn = lambda r: family.init(r, dummy_batch(config))  # noqa: E731
    rng = jax.random.key(config.seed)
    abstract_params = jax.eval_shape(init_fn, rng)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = sharding.replicated(mesh)
    shardings = {"step": rep, "params": sharding.param_shardings(abstract_params, mesh, rules),
                 "opt_state": sharding.param_shardings(abstract_opt, mesh, rules), "rng": rep}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                "opt_state": abstract_opt, "rng": jax.eval_shape(lambda: rng)}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    frozen = optim.frozen_mask(abstract_params, list(config.optim.frozen))
    if feature_cache.kind(config) != "off":
        feature_cache.check_frozen(family, frozen)
    return Skeleton(family, mesh, tx, schedule, steps, init_fn, abstract, shardings, frozen)


def restore(sk: Skeleton, workdir: str, step: int | None = None, *, resuming: bool = False
            ) -> tuple[int, dict] | None:
    """(step, state) of the given or newest good checkpoint in workdir, or None if it has none.
    ``resuming`` (the trainer): unusable checkpoints newer than the one restored are set aside, as the run
    will save those steps again."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return None
    ck = ckpt_lib.Checkpointer(path, read_only=True)
    try:
        if step is not None:
            return step, ck.restore(step, sk.abstract_state)[0]
        found = ck.restore_latest_good(sk.abstract_state, set_aside=resuming)
        return None if found is None else (found[0], found[1])
    finally:
        ck.close()


def fresh_state(sk: Skeleton, config) -> tuple[dict, list[str]]:
    """Initial state: random init on the shardings, pretrained weights, data statistics."""
    p_shard = sk.state_shardings["params"]
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    params = jax.jit(sk.init_fn, out_shardings=p_shard)(init_rng)
    replacements, notes = sk.family.load_pretrained(sk.abstract_state["params"])
    params = _merge(params, replacements, p_shard, "pretrained weights")
    batches = (sharding.global_batch(b, sk.mesh)
               for b in pipeline.make_train_iterator(config.input, sk.family.tokenizer))
    stats, prep_notes = sk.family.prepare(params, batches)
    params = _merge(params, stats, p_shard, "data statistics")
    opt_state = jax.jit(sk.tx.init, out_shardings=sk.state_shardings["opt_state"])(params)
    # Placed by jit, not device_put: in a multi-process run the sharding spans other processes' devices.
    step0, state_rng = jax.jit(lambda r: (jnp.int32(0), r), out_shardings=sk.state_shardings["step"])(state_rng)
    state = {"step": step0, "params": params, "opt_state": opt_state, "rng": state_rng}
    return state, notes + prep_notes


def make_train_step(sk: Skeleton):
    """The jitted train step. Frozen parameters enter the loss behind ``stop_gradient``: their weight
    gradients are never formed (the optimizer would zero them anyway), while gradients still flow through
    them to the trainable parameters upstream."""
    family, tx, schedule = sk.family, sk.tx, sk.schedule

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params):
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, sk.frozen)
            return family.loss(params, batch, rng, train=True)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = _apply_state_updates(params, metrics.pop(STATE_UPDATES, {}), sk.frozen)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=0, out_shardings=(sk.state_shardings, None))


def _apply_state_updates(params, new_values: dict[str, jax.Array], frozen):
    """Writes a family's non-gradient updates (``families.base.STATE_UPDATES``) into the params, by path.
    Each must name a frozen parameter (the optimizer leaves those alone) of the same shape."""
    if not new_values:
        return params
    unused = set(new_values)

    def put(path, leaf, is_frozen):
        name = sharding.path_str(path)
        if name not in new_values:
            return leaf
        unused.discard(name)
        value = new_values[name]
        if not is_frozen:
            raise ValueError(f"the family updates parameter {name} outside the optimizer, but it is trained: "
                             "add it to config.optim.frozen")
        if value.shape != leaf.shape:
            raise ValueError(f"state update for {name} has shape {value.shape}, the parameter {leaf.shape}")
        return value.astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(put, params, frozen)
    if unused:
        raise ValueError(f"state updates for parameters that do not exist: {sorted(unused)}")
    return params


class _StopRequest:
    """Turns SIGTERM/SIGINT into a stop at a step boundary (``requested(step)``), the same on all processes.

    One process: a Python handler sets a flag. Several: JAX's preemption service (started by
    ``jax.distributed.initialize``) owns SIGTERM and makes the processes agree on a step
    (``reached_preemption_sync_point``); a SIGINT is passed on to it as a SIGTERM. With that service
    switched off (``jax_enable_preemption_service``), the processes exchange their flags every step.
    """

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        self._multi = jax.process_count() > 1
        self._sync = self._multi and jax.config.jax_enable_preemption_service

    def requested(self, step: int) -> bool:
        if not self._multi:
            return self.signal is not None
        from jax.experimental import multihost_utils
        if self._sync:
            if multihost_utils.reached_preemption_sync_point(step):
                print(f"[train] preemption notice: every process stops at step {step}", flush=True)
                return True
            return False
        return sharding.any_process(self.signal is not None)

    def __enter__(self):
        for sig in (signal.SIGINT,) if self._sync else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        print(f"[train] received {signal.Signals(signum).name}: saving a checkpoint at the next step",
              flush=True)
        if self._sync:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which tells the others

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (resuming if the workdir has a checkpoint) and evaluates. Returns the last metrics.

    A multi-process run (config.distributed or the environment, see ``ladic_jax.distributed``) is
    initialised here unless the entry point did it already, as ladic-train does before any other JAX use.
    """
    distributed.initialize(config)
    os.makedirs(workdir, exist_ok=True)
    s = skeleton(config)
    found = restore(s, workdir, resuming=True)
    if found is not None:
        state, notes = found[1], [f"resumed from {workdir}/checkpoints/{found[0]}"]
    else:
        state, notes = fresh_state(s, config)
    for n in notes:
        print(f"[train] {n}", flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    writer = MetricWriter(workdir)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    evaluator = Evaluator(s.family, config, s.mesh)
    train_step = make_train_step(s)

    step = int(jax.device_get(state["step"]))
    if jax.process_index() == 0:
        n_params = optim.count_params(state["params"])
        n_frozen = optim.count_params(state["params"], s.frozen)
        report.write_param_counts(workdir, n_params, n_params - n_frozen)
        print(f"[train] {config.family}: {n_params:,} parameters ({n_params - n_frozen:,} trainable); "
              f"{s.total_steps} steps of batch {config.input.batch_size}; mesh {dict(s.mesh.shape)}", flush=True)
    batches = pipeline.make_train_iterator(config.input, s.family.tokenizer, start_step=step)
    cache, cache_notes = feature_cache.for_run(s.family, state["params"], s.mesh, config, workdir)
    for n in cache_notes:
        print(f"[train] {n}", flush=True)
    progress = Progress(s.total_steps, step, config.input.batch_size)
    last: dict[str, Any] = {}

    def save(step_):
        checkpointer.save(step_, state, {"step": step_, "examples_seen": step_ * config.input.batch_size})

    def close_all():
        checkpointer.close()  # (waits for the last save)
        writer.close()
        evaluator.close()

    stop_at = config.get("stop_at_step") or 0
    if step < s.total_steps and 0 < stop_at <= step:
        print(f"[train] at step {step}, config.stop_at_step={stop_at}: nothing to train", flush=True)
        close_all()
        return last
    pending = None
    with _StopRequest() as stop:
        while step < s.total_steps:
            local = next(batches)
            batch = sharding.global_batch(cache.attach(local) if cache else local, s.mesh)
            state, metrics = train_step(state, batch)
            step += 1
            if pending is not None:
                _check_finite(pending, step - 1, checkpointer)
            pending = metrics
            checkpointer.poll()
            if step % config.log_every == 0 or step == s.total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(m, step, checkpointer)
                m.update(progress.update(step, m))
                writer.write(step, m, prefix="train/")
                _log_bad_records(writer, step, batches.pop_counts())
                last.update(m)
            if stop.requested(step) or step == stop_at != s.total_steps:
                _check_finite(jax.device_get(metrics), step, checkpointer)
                save(step)
                checkpointer.wait()
                why = "" if stop.signal else " (config.stop_at_step)"
                print(f"[train] stopped at step {step}{why}; checkpoint saved, resume by running again", flush=True)
                close_all()
                return last
            if step % config.checkpoint.every_steps == 0 or step == s.total_steps:
                _check_finite(jax.device_get(metrics), step, checkpointer)
                save(step)
            if config.eval.every_steps and (step % config.eval.every_steps == 0) and step != s.total_steps:
                last.update(_evaluate(evaluator, state, step, workdir, config, writer))
    checkpointer.close()  # (waits for the last save)
    if config.eval.at_end:
        last.update(_evaluate(evaluator, state, step, workdir, config, writer))
    evaluator.close()
    writer.close()
    return last


def _log_bad_records(writer: MetricWriter, step: int, counts: dict[str, int]) -> None:
    """What the input pipeline's bad-record rules did since the last log step, as data/<count>."""
    writer.write(step, counts, prefix="data/")
    skipped = {k[len("skipped_"):]: v for k, v in counts.items() if k.startswith("skipped_") and v}
    if skipped and jax.process_index() == 0:
        print(f"[data] step {step}: skipped {sum(skipped.values())} of {counts['examples']} records ("
              + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")", flush=True)


def _check_finite(metrics, step: int, checkpointer) -> None:
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(float(metrics[k]))]
    if bad:
        checkpointer.wait()
        good = checkpointer.latest_step()
        checkpointer.close()
        where = f"checkpoint of step {good} is intact" if good is not None else "no checkpoint was written yet"
        raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}; stopping; the last good {where}")


def _evaluate(evaluator: Evaluator, state, step, workdir, config, writer) -> dict[str, Any]:
    out = {}
    captions = evaluator.family.evaluation == "captions"
    for n_steps in config.eval.sampling_steps if captions else (None,):
        tag = "" if n_steps is None or n_steps == config.sampler.steps else f"_s{n_steps}"
        if step in report.evaluated_steps(workdir, tag):  # a finished run started again
            if jax.process_index() == 0:
                print(f"[eval] step {step}{f', {n_steps} sampling steps' if captions else ''}: already evaluated "
                      f"({report.metrics_path(workdir, step, tag)})", flush=True)
            continue
        t0 = time.perf_counter()
        res = evaluator.run(state["params"], step=step, workdir=workdir, steps=n_steps,
                            limit=config.eval.get("limit") or None, tag=tag)
        if jax.process_index() == 0:
            what = f"{n_steps} sampling steps, " if captions else ""
            print(f"[eval] step {step}, {what}{res['num_images']} images "
                  f"({time.perf_counter() - t0:.0f}s): " + report.headline(res), flush=True)
            prefix = f"eval_s{n_steps}/" if captions else "eval/"
            writer.write(step, {k: v for k, v in res.items() if isinstance(v, (int, float))}, prefix=prefix)
            out.update({prefix + k: v for k, v in res.items()})
    return out
