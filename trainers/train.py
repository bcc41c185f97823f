"""``train_and_evaluate(config, workdir)``: the training loop, read top to bottom.

One state pytree ``{"step", "params", "opt_state", "rng"}``, one pure ``train_step``
pmapped over the local devices, evaluation at an interval, orbax checkpoints that
hold the loader's state too, so a resumed run ends with the same weights, bit for
bit, as one that never stopped.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from adapters.jax import device_batches, process_part
from loaders import LoaderState, ProcessPart, Sampler

from . import checkpoints, distributed, parallel
from .audit import AuditLog, trim_audit
from .config import Config, ConfigError, OptimizerConfig, ScheduleConfig, resume_changes
from .data import build_adapter, build_sources, eval_loader, holds_part, module_sources, open_data_module, to_numpy
from .losses import build_loss, takes_step
from .models import build_model, takes_rng

MAX_AHEAD = 16  # steps the loop may dispatch ahead of the devices


# --------------------------------------------------------------------------- optax pieces
def make_schedule(cfg: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule, from optax parts."""
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else None
    rest = max(1, total_steps - cfg.warmup_steps)
    if cfg.name == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.name == "warmup_cosine":
        main = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.end_factor)
    else:  # cosine_restarts: cycles growing by cycle_mult, peaks shrinking by peak_decay
        cycles, bounds, length, peak, covered = [], [], float(cfg.cycle_steps), cfg.lr, 0
        while covered < rest:
            n = max(1, int(round(length)))
            cycles.append(optax.cosine_decay_schedule(peak, n, alpha=cfg.end_factor))
            covered += n
            bounds.append(covered)
            length, peak = length * cfg.cycle_mult, peak * cfg.peak_decay
        main = optax.join_schedules(cycles, bounds[:-1])
    return main if warmup is None else optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """An optax optimizer by name, with the schedule as its learning rate."""
    factory = getattr(optax, cfg.name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"optax has no optimizer {cfg.name!r} (e.g. adam, adamw, sgd, lamb, lion)")
    try:
        tx = factory(learning_rate=schedule, **cfg.kwargs)
    except TypeError as e:
        raise ValueError(f"optax.{cfg.name} does not take {cfg.kwargs}: {e}") from None
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm else tx


# --------------------------------------------------------------------------- steps
def initial_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[Any, dict[str, Any]]:
    """The model's graph definition and the train state ``{"step", "params", "opt_state", "rng"}`` (numpy).

    Parameters are a plain nested dict, not nnx ``Variable`` objects: every pmap call
    flattens its arguments, and flattening Variables runs Python code per parameter
    (~0.3 ms a step for the default CNN, measured).
    """
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(params),
             "rng": np.asarray(jax.random.PRNGKey(seed))}
    return graphdef, jax.tree.map(np.asarray, state)


def make_train_step(graphdef, tx, loss_fn: Callable, pass_rng: bool) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, gradients averaged over devices. A loss that
    takes ``step`` (see :func:`trainers.losses.build_loss`) gets the step being trained."""
    with_step = takes_step(loss_fn)

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), parallel.device_index())
        batch = _as_float_input(batch)

        def loss_of(params):
            model = nnx.merge(graphdef, params)
            outputs = model(batch["x"], rng=rng) if pass_rng else model(batch["x"])
            return loss_fn(outputs, batch, step=state["step"]) if with_step else loss_fn(outputs, batch)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        metrics = {"loss": loss, **metrics}  # the loop watches "loss" (finite?) even if a custom loss leaves it out
        grads, metrics = parallel.pmean(grads), parallel.pmean(metrics)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

    return train_step


def make_eval_step(graphdef, loss_fn: Callable) -> Callable:
    """``eval_step(params, batch) -> (metric sums, valid count)`` over all devices."""

    def eval_step(params, batch):
        batch = _as_float_input(batch)
        _, metrics = loss_fn(nnx.merge(graphdef, params)(batch["x"]), batch)
        count = batch["_valid"].astype(jnp.float32).sum()
        return parallel.psum({k: v * count for k, v in metrics.items()}), parallel.psum(count)

    return eval_step


def _as_float_input(batch):
    x = batch["x"]
    return {**batch, "x": x.astype(jnp.float32) if not jnp.issubdtype(x.dtype, jnp.floating) else x}


def params_sha256(params: Any) -> str:
    """SHA-256 over every parameter's path, dtype, shape and bytes (host copy)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        arr = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- files
def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _trim_metrics(path: str, last_step: int, *, drop_eval_at_last: bool = False) -> None:
    """Keep the metric rows up to the checkpoint we resume from (later ones will be written again), and
    the final evaluation's row at that step too unless ``drop_eval_at_last`` (it will be written again).

    A line that is not a JSON row with a step (a write cut short by a kill) is dropped with a warning.
    """
    if not os.path.exists(path) or not last_step:
        _write_atomic(path, "")
        return
    keep: list[str] = []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {"step": -1}
            except ValueError:
                row = None
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                print(f"warning: {path} line {n} is not a complete JSON row with a step (a write cut short by a "
                      f"kill?): dropped it, resuming from the intact rows", file=sys.stderr, flush=True)
            elif 0 <= row["step"] < last_step or row["step"] == last_step and not (drop_eval_at_last and "lr" not in row):
                keep.append(line.rstrip("\n") + "\n")
    _write_atomic(path, "".join(keep))


def check_resume(mgr: Any, config: Config, workdir: str) -> None:
    """Refuse to resume the latest checkpoint with a config that changes the train state or the training
    data and its order (a :class:`ConfigError` listing each change); note the harmless changes on stderr."""
    latest = mgr.latest_step()
    if latest is None:
        return
    where = os.path.join(workdir, "checkpoints", str(latest))
    refused, allowed = resume_changes(checkpoints.saved_config(mgr, latest), config.to_dict())
    if refused:
        also = f"\n(allowed, also changed: {', '.join(allowed)})" if allowed else ""
        raise ConfigError(
            f"cannot resume from {where}: these settings differ from the config it was saved with, and change the "
            "train state or the training data and its order:\n  " + "\n  ".join(refused) + also +
            "\nstart over with --fresh (deletes this workdir's checkpoints), or train in a new --workdir"
        )
    if allowed:
        length = any(c.startswith(("train.steps:", "train.epochs:")) for c in allowed) and config.schedule.name != "constant"
        lr = f"; the {config.schedule.name} learning-rate schedule now spans the new length" if length else ""
        print(f"{distributed.process_label()}resuming from {where} with changed settings that keep the train state "
              "and the data order: "
              f"{', '.join(allowed)}{lr}", file=sys.stderr, flush=True)


class _StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the current step and exits.

    In a multi-process run the processes must agree on the step they stop at: there SIGTERM is
    left to JAX's preemption notice (:meth:`agreed`), which picks the same step for every process,
    and Ctrl-C ends the one process (``trainers.run`` tells the others, which stop naming it).
    """

    def __init__(self, multi_process: bool = False) -> None:
        self.signal: int | None = None
        self.multi_process = multi_process
        self._previous: dict[int, Any] = {}

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (called at every step, by every process)."""
        if self.multi_process and self.signal is None:
            from jax.experimental import multihost_utils

            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # JAX's preemption service is turned off: no agreed stop, SIGTERM ends the process
                self.multi_process = False
                return False
            if reached:
                self.signal = signal.SIGTERM
        return self.signal is not None

    def __enter__(self) -> _StopRequest:
        for sig in () if self.multi_process else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, sig, frame) -> None:
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = sig

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- pieces of the run
def build_data(config: Config, devices: list, modules: list | None = None) -> tuple[Any, Any | None, Sampler]:
    """This process's training source and its sampler, and the evaluation source (or None).

    With ``data.module``, the DataModule (set up, appended to ``modules`` for its
    teardown) gives the sources; a source holding one process's part brings that part.
    """
    cfg = config.data
    if cfg.module:
        module = open_data_module(cfg)
        if modules is not None:
            modules.append(module)
        train_src, eval_src = module_sources(cfg, module)
        held = getattr(train_src, "part", None) if getattr(train_src, "holds_part", False) else None
        part = held if held is not None and held.count > 1 else process_part("global")
    else:
        part = process_part("contiguous" if holds_part(cfg) else "global")
        train_src, eval_src = build_sources(cfg, part)
    blocks = None
    if cfg.shuffle == "block":
        blocks = getattr(train_src, "block_starts", None)
        if blocks is None:
            raise ValueError(f"data.shuffle=block needs a source with block_starts; {type(train_src).__name__} has none")
    sampler = Sampler(len(train_src), cfg.batch_size, seed=config.seed, shuffle=cfg.shuffle, part=part, blocks=blocks)
    if sampler.local_batch_size % len(devices):
        raise ValueError(
            f"data.batch_size={cfg.batch_size} gives {sampler.local_batch_size} records per process, which do not "
            f"split over {len(devices)} local devices: use a multiple of {len(devices) * part.count}"
        )
    return train_src, eval_src, sampler


class ModelInputs:
    """A host batch (torch tensors or numpy) as the step's inputs: ``x``, ``y`` and ``_valid``, as numpy."""

    def __init__(self, input_key: str, label_key: str) -> None:
        self.input_key = input_key
        self.keymap = {input_key: "x", label_key: "y", "_valid": "_valid"}

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        batch = to_numpy(batch)
        if self.input_key not in batch:
            raise KeyError(f"data.input_key {self.input_key!r} is not in the batch (keys: {sorted(batch)})")
        return {self.keymap[k]: v for k, v in batch.items() if k in self.keymap}


def evaluate(p_eval: Callable, params_r: Any, batches: Any) -> dict[str, float]:
    """Every metric of ``p_eval`` averaged over the valid records of ``batches`` (padding masked out)."""
    sums: dict[str, float] = collections.defaultdict(float)
    count = 0.0
    for batch in batches:
        s, c = jax.tree.map(parallel.first_replica, p_eval(params_r, batch))  # sums over all devices: every copy alike
        for k, v in s.items():
            sums[k] += float(v)
        count += float(c)
    return {f"eval_{k}": v / count for k, v in sums.items()}


def restore_latest(mgr: Any, state: dict[str, Any], source: Any, sampler: Sampler) -> tuple[dict[str, Any], int]:
    """The latest checkpoint's train state and the step to resume from (the initial state and 0 if none).

    The checkpoint's loader state must belong to this data and order (else ``StateMismatchError``).
    """
    latest = mgr.latest_step()
    if latest is None:
        return state, 0
    restored = checkpoints.restore(mgr, latest, state)
    state = jax.tree.map(np.asarray, restored["state"])
    step = LoaderState.from_dict(restored["loader"]).check(source, sampler)
    if step != int(state["step"]):
        raise ValueError(f"checkpoint {latest}: the train state is at step {int(state['step'])}, the loader at {step}")
    return state, step


class Meter:
    """The log window: losses fetched from the devices at flush time, samples/s, and where time went.

    Data wait is time spent getting the next batch while the devices had no step left to
    run (the last dispatched step was already done): the real stall. Time spent reading
    while a step still runs is hidden by JAX's asynchronous dispatch; it is logged apart
    as ``input_share``.
    """

    def __init__(self, log: Any, schedule: optax.Schedule, records_per_step: int, bar: Any) -> None:
        self.log, self.schedule, self.records_per_step, self.bar = log, schedule, records_per_step, bar
        self.last: dict[str, float] = {}  # the metrics of the last step flushed
        self._last_loss: Any = None  # one output of the step dispatched last
        self._reset()

    def _reset(self) -> None:
        self.pending: list[tuple[int, Any]] = []
        self.waited = self.reading = 0.0
        self.start = time.perf_counter()

    def read(self, took: float) -> None:
        """Count ``took`` seconds spent getting a batch (a stall if the devices were idle)."""
        self.reading += took
        if self._last_loss is None or self._last_loss.is_ready():
            self.waited += took

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        """A dispatched step's metrics; the loop never runs more than ``MAX_AHEAD`` steps ahead of the devices."""
        self.pending.append((step, metrics))
        self._last_loss = metrics["loss"]
        if len(self.pending) > MAX_AHEAD:  # a long queue of pmap steps on CPU host devices can deadlock XLA
            self.pending[-MAX_AHEAD][1]["loss"].block_until_ready()

    def flush(self, step: int) -> None:
        """Fetch the window's metrics, stop on a non-finite loss, write one ``metrics.jsonl`` row."""
        if not self.pending:
            return
        fetched = [{k: parallel.first_replica(v) for k, v in m.items()} for _, m in self.pending]  # pmean'd: alike
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        for (s, _), m in zip(self.pending, fetched, strict=True):
            values = {k: float(v) for k, v in m.items()}
            if not math.isfinite(values.get("loss", 0.0)):
                raise FloatingPointError(f"non-finite loss {values['loss']} at step {s}; stopping the run")
            self.last = values
        row = {"step": step, **self.last, "lr": float(self.schedule(step - 1)),
               "samples_per_s": len(self.pending) * self.records_per_step / elapsed,
               "data_wait_share": self.waited / elapsed, "input_share": self.reading / elapsed}
        self.write(row)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}",
                             wait=f"{100 * row['data_wait_share']:.1f}%", refresh=False)
        self._reset()

    def write(self, row: dict[str, Any]) -> None:
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()


def _start_workdir(workdir: str, fresh: bool) -> None:
    """Make ``workdir`` (process 0; every process waits for it), deleting its checkpoints and logs if ``fresh``."""
    if not distributed.is_primary():
        distributed.barrier("tandem-workdir")
        return
    os.makedirs(workdir, exist_ok=True)
    if fresh:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "audit"), ignore_errors=True)
        # and the anomaly pipeline's results, which describe the run being replaced
        for name in ("metrics.jsonl", "summary.json", "results.json", "complete.h5", "lite.h5", "report.html", "report.pdf"):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
    distributed.barrier("tandem-workdir")


# --------------------------------------------------------------------------- the loop
def train_and_evaluate(config: Config, workdir: str, *, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint unless ``fresh``.

    Returns the summary (also written to ``workdir/summary.json``); an interrupted
    run (SIGTERM, Ctrl-C) saves a checkpoint and returns the summary with
    ``"interrupted"`` set to the signal's name (``"SIGTERM"``, ``"SIGINT"``).
    A ``data.module`` DataModule's ``teardown()`` runs at the end, however the run ends.
    """
    modules: list = []
    try:
        return _train_and_evaluate(config, workdir, fresh, progress, modules)
    finally:
        for module in modules:
            module.teardown()


def _train_and_evaluate(config: Config, workdir: str, fresh: bool, progress: bool, modules: list) -> dict[str, Any]:
    t_start = time.time()
    _start_workdir(workdir, fresh)
    cfg, tc = config.data, config.train
    primary, label = distributed.is_primary(), distributed.process_label()
    mgr = checkpoints.manager(workdir, tc.keep_checkpoints)
    check_resume(mgr, config, workdir)
    devices = parallel.local_devices(tc.devices)  # fed by this process
    spanned = parallel.global_devices(tc.devices)  # what pmap's collectives span: every process's devices
    train_src, eval_src, sampler = build_data(config, devices, modules)
    total = tc.steps if tc.steps is not None else (tc.epochs or 1) * sampler.steps_per_epoch
    latest = mgr.latest_step()
    if latest is not None and latest > total:
        raise ConfigError(f"{os.path.join(workdir, 'checkpoints', str(latest))} is at step {latest}, past this run's "
                          f"{total} steps (train.steps / train.epochs): ask for at least {latest}, or start over with --fresh")
    inputs = ModelInputs(cfg.input_key, cfg.label_key)

    sample = inputs(train_src.read_batch(np.array([sampler.indices(0)[0]])))
    model = build_model(config.model.name, config.model.kwargs, sample["x"].shape[1:], config.seed)
    schedule = make_schedule(config.schedule, total)
    tx = make_optimizer(config.optimizer, schedule)
    loss_fn = build_loss(config.loss.name, config.loss.kwargs)
    graphdef, state = initial_state(model, tx, config.seed)

    state, start = restore_latest(mgr, state, train_src, sampler)
    if start:
        print(f"{label}resumed from {os.path.join(workdir, 'checkpoints', str(start))} at step {start}", flush=True)
    resolved = config.to_dict()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if primary:
        _write_atomic(os.path.join(workdir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
        _trim_metrics(metrics_path, start, drop_eval_at_last=start >= total)

    p_train = parallel.pmapped(make_train_step(graphdef, tx, loss_fn, takes_rng(model)), spanned, donate=(0,))
    p_eval = parallel.pmapped(make_eval_step(graphdef, loss_fn), spanned)
    state_r = parallel.replicate(state, devices)
    # Every process evaluates its slice of each evaluation batch (padded alike, so all run as many steps).
    eval_part = ProcessPart(sampler.part.index, sampler.part.count, "global")
    eval_batch = len(spanned) * math.ceil(min(cfg.eval_batch_size, len(eval_src) if eval_src else 1) / len(spanned))

    def run_eval() -> dict[str, float]:
        if eval_src is None:
            return {}
        batches = map(inputs, eval_loader(cfg, eval_src, eval_batch, eval_part))
        return evaluate(p_eval, state_r["params"], device_batches(batches, devices=devices))

    saved = [start]  # the last checkpoint's step, for the lost-process message (no orbax call from its thread)

    def save(step: int) -> None:
        # The device feed reads ahead of training: the position to resume from is the
        # step the model has trained on, in the shared format the adapters produce.
        loader_state = LoaderState.create(step, train_src, sampler).to_dict()
        checkpoints.save(mgr, step, parallel.unreplicate(state_r), loader_state, resolved)
        saved[0] = step

    bar = _progress(total, start, progress and primary)
    eval_metrics: dict[str, float] = {}
    step, interrupted = start, None
    adapter = build_adapter(cfg, train_src, sampler)  # kept alive while its stream runs
    host_batches = map(inputs, adapter.iter_from(start))
    audit = None
    if tc.audit:
        audit = AuditLog(workdir, sampler.part.index, sampler.part.count, start, sampler, ["x", "y"])
        host_batches = map(audit.observe, host_batches)
    elif primary:  # audited before: drop the rows of steps after the checkpoint, which will be trained again
        trim_audit(workdir, start)
    stream = device_batches(host_batches, devices=devices, size=2)
    distributed.describe(lambda: f"at step {step} (last checkpoint: {saved[0] or 'none'}, in {workdir})")
    multi = jax.process_count() > 1
    with open(metrics_path if primary else os.devnull, "a") as log, _StopRequest(multi) as stop:
        meter = Meter(log, schedule, cfg.batch_size, bar)
        while step < total:
            t = time.perf_counter()
            batch = next(stream)
            meter.read(time.perf_counter() - t)
            state_r, metrics = p_train(state_r, batch)
            step += 1
            meter.add(step, metrics)
            stopping = stop.agreed(step)
            eval_due = tc.eval_every and step % tc.eval_every == 0
            ckpt_due = tc.checkpoint_every and step % tc.checkpoint_every == 0
            if step % tc.log_every == 0 or step == total or eval_due or ckpt_due or stopping:
                meter.flush(step)
                if audit is not None:
                    audit.write(step)
            if eval_due and step != total:
                eval_metrics = run_eval()
                meter.write({"step": step, **eval_metrics})
                if primary:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            if ckpt_due or step == total or stopping:
                save(step)
            if stopping:
                interrupted = signal.Signals(stop.signal).name
                break
        stream.close()
        if audit is not None:
            audit.close()
        if interrupted is None:
            eval_metrics = run_eval()
            meter.write({"step": step, **eval_metrics})
    bar.close()
    mgr.close()
    params = parallel.unreplicate(state_r)["params"]
    distributed.finish()  # the last step that could wait on another process is done
    return _finish(workdir, t_start, step, meter.last, eval_metrics, params, len(spanned), cfg.adapter, interrupted,
                   primary)


def _finish(workdir: str, t_start: float, step: int, last: dict[str, float], eval_metrics: dict[str, float],
            params: Any, devices: int, adapter: str, interrupted: str | None, primary: bool = True) -> dict[str, Any]:
    """The run's summary, written to ``summary.json`` (by process 0) unless the run was interrupted."""
    summary = {
        "steps": step,
        "final_metrics": last,
        "eval": eval_metrics,
        "accuracy": eval_metrics.get("eval_accuracy"),
        "wall_time_s": round(time.time() - t_start, 2),
        "params_sha256": params_sha256(params),
        "devices": devices,
        "adapter": adapter,
        "workdir": os.path.abspath(workdir),
        "checkpoints": os.path.abspath(os.path.join(workdir, "checkpoints")),
        "metrics": os.path.abspath(os.path.join(workdir, "metrics.jsonl")),
    }
    if interrupted:
        print(f"{distributed.process_label()}{interrupted}: saved a checkpoint at step {step}; run the same command "
              "to resume", flush=True)
        return {"interrupted": interrupted, **summary}
    if primary:
        _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
