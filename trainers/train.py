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
from loaders import LoaderState, Sampler

from . import checkpoints, parallel
from .config import Config, OptimizerConfig, ScheduleConfig
from .data import build_sources, eval_loader, to_numpy, train_batches
from .losses import build_loss
from .models import build_model, takes_rng

TRACES: collections.Counter = collections.Counter()  # how often each step function was traced
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
    """``train_step(state, batch) -> (state, metrics)``, gradients averaged over devices."""

    def train_step(state, batch):
        TRACES["train_step"] += 1
        rng = jax.random.fold_in(jax.random.fold_in(state["rng"], state["step"]), parallel.device_index())
        batch = _as_float_input(batch)

        def loss_of(params):
            model = nnx.merge(graphdef, params)
            outputs = model(batch["x"], rng=rng) if pass_rng else model(batch["x"])
            return loss_fn(outputs, batch)

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
        TRACES["eval_step"] += 1
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


def _trim_metrics(path: str, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    _write_atomic(path, "".join(keep))


class _StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the current step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
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


# --------------------------------------------------------------------------- the loop
def train_and_evaluate(config: Config, workdir: str, *, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint unless ``fresh``.

    Returns the summary (also written to ``workdir/summary.json``); an interrupted
    run (SIGTERM, Ctrl-C) returns ``{"interrupted": True, ...}`` after saving.
    """
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    if fresh:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
    cfg, tc = config.data, config.train
    devices = parallel.local_devices(tc.devices)
    mode = "contiguous" if cfg.source == "h5_cached" else "global"
    part = process_part(mode)
    train_src, eval_src = build_sources(cfg, part)
    blocks = train_src.block_starts if cfg.shuffle == "block" else None
    sampler = Sampler(len(train_src), cfg.batch_size, seed=config.seed, shuffle=cfg.shuffle, part=part, blocks=blocks)
    if sampler.local_batch_size % len(devices):
        raise ValueError(
            f"data.batch_size={cfg.batch_size} gives {sampler.local_batch_size} records per process, which do not "
            f"split over {len(devices)} local devices: use a multiple of {len(devices) * part.count}"
        )
    total = tc.steps if tc.steps is not None else (tc.epochs or 1) * sampler.steps_per_epoch
    keymap = {cfg.input_key: "x", cfg.label_key: "y", "_valid": "_valid"}

    def prepare(batch):
        batch = to_numpy(batch)
        if cfg.input_key not in batch:
            raise KeyError(f"data.input_key {cfg.input_key!r} is not in the batch (keys: {sorted(batch)})")
        return {keymap[k]: v for k, v in batch.items() if k in keymap}

    sample = prepare(train_src.read_batch(np.array([sampler.indices(0)[0]])))
    model = build_model(config.model.name, config.model.kwargs, sample["x"].shape[1:], config.seed)
    schedule = make_schedule(config.schedule, total)
    tx = make_optimizer(config.optimizer, schedule)
    loss_fn = build_loss(config.loss.name, config.loss.kwargs)
    graphdef, state = initial_state(model, tx, config.seed)

    mgr = checkpoints.manager(workdir, tc.keep_checkpoints)
    batches = train_batches(cfg, train_src, sampler)
    resolved = config.to_dict()
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        restored = checkpoints.restore(mgr, latest, state)
        state = jax.tree.map(np.asarray, restored["state"])
        batches.load_state_dict(restored["loader"])
        start = int(state["step"])
        print(f"resumed from {os.path.join(workdir, 'checkpoints', str(latest))} at step {start}", flush=True)
    _write_atomic(os.path.join(workdir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _trim_metrics(metrics_path, start)

    p_train = parallel.pmapped(make_train_step(graphdef, tx, loss_fn, takes_rng(model)), devices, donate=(0,))
    p_eval = parallel.pmapped(make_eval_step(graphdef, loss_fn), devices)
    state_r = parallel.replicate(state, devices)
    eval_batch = len(devices) * math.ceil(min(cfg.eval_batch_size, len(eval_src) if eval_src else 1) / len(devices))

    def evaluate(params_r) -> dict[str, float]:
        if eval_src is None:
            return {}
        sums: dict[str, float] = collections.defaultdict(float)
        count = 0.0
        for batch in device_batches(map(prepare, eval_loader(cfg, eval_src, eval_batch)), devices=devices):
            s, c = jax.device_get(p_eval(params_r, batch))
            for k, v in s.items():
                sums[k] += float(v[0])
            count += float(c[0])
        return {f"eval_{k}": v / count for k, v in sums.items()}

    def save(step: int) -> None:
        # The device prefetcher has pulled batches past ``step`` from the adapter; the
        # position to resume from is the step the model has trained on, in the same
        # shared format the adapters produce.
        loader_state = LoaderState.create(step, train_src, sampler).to_dict()
        checkpoints.save(mgr, step, parallel.unreplicate(state_r), loader_state, resolved)

    bar = _progress(total, start, progress)
    pending: list[tuple[int, Any]] = []
    # Data wait: time spent getting the next batch while the devices had no step left
    # to run (the last dispatched step was already done). Time spent reading while a
    # step still runs is hidden by JAX's asynchronous dispatch; it is logged apart.
    waited, reading, window_start, window_steps = 0.0, 0.0, time.perf_counter(), 0
    records_per_step = cfg.batch_size
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    step = start
    interrupted = None
    with open(metrics_path, "a") as log, _StopRequest() as stop:

        def flush(step: int) -> None:
            nonlocal pending, waited, reading, window_start, window_steps, last_metrics
            if not pending:
                return
            fetched = [{k: np.asarray(v) for k, v in m.items()} for _, m in pending]  # cheaper than device_get
            elapsed = time.perf_counter() - window_start
            for (s, _), m in zip(pending, fetched, strict=True):
                values = {k: float(v[0]) for k, v in m.items()}
                if not math.isfinite(values.get("loss", 0.0)):
                    raise FloatingPointError(f"non-finite loss {values['loss']} at step {s}; stopping the run")
                last_metrics = values
            row = {"step": step, **last_metrics, "lr": float(schedule(step - 1)),
                   "samples_per_s": window_steps * records_per_step / max(elapsed, 1e-9),
                   "data_wait_share": waited / max(elapsed, 1e-9),
                   "input_share": reading / max(elapsed, 1e-9)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}",
                            wait=f"{100 * row['data_wait_share']:.1f}%", refresh=False)
            pending, waited, reading, window_start, window_steps = [], 0.0, 0.0, time.perf_counter(), 0

        stream = device_batches(map(prepare, batches), devices=devices, size=2)
        last = None  # one output of the step dispatched last
        while step < total:
            t = time.perf_counter()
            batch = next(stream)
            took = time.perf_counter() - t
            reading += took
            if last is None or last.is_ready():
                waited += took
            state_r, metrics = p_train(state_r, batch)
            step += 1
            window_steps += 1
            pending.append((step, metrics))
            last = metrics["loss"]
            if len(pending) > MAX_AHEAD:  # keep XLA's queue short (PITFALLS: pmap on CPU devices)
                pending[-MAX_AHEAD][1]["loss"].block_until_ready()
            eval_due = tc.eval_every and step % tc.eval_every == 0
            ckpt_due = tc.checkpoint_every and step % tc.checkpoint_every == 0
            if step % tc.log_every == 0 or step == total or eval_due or ckpt_due or stop.signal:
                flush(step)
            if eval_due and step != total:
                eval_metrics = evaluate(state_r["params"])
                log.write(json.dumps({"step": step, **eval_metrics}) + "\n")
                log.flush()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            if ckpt_due or step == total or stop.signal:
                save(step)
            if stop.signal:
                interrupted = signal.Signals(stop.signal).name
                break
        close = getattr(stream, "close", None)
        if close:
            close()
        if interrupted is None:
            eval_metrics = evaluate(state_r["params"])
            log.write(json.dumps({"step": step, **eval_metrics}) + "\n")
    bar.close()
    mgr.close()
    final_params = parallel.unreplicate(state_r)["params"]
    summary = {
        "steps": step,
        "final_metrics": last_metrics,
        "eval": eval_metrics,
        "accuracy": eval_metrics.get("eval_accuracy"),
        "wall_time_s": round(time.time() - t_start, 2),
        "params_sha256": params_sha256(final_params),
        "devices": len(devices),
        "adapter": cfg.adapter,
        "workdir": os.path.abspath(workdir),
        "checkpoints": os.path.abspath(os.path.join(workdir, "checkpoints")),
        "metrics": os.path.abspath(metrics_path),
    }
    if interrupted:
        print(f"{interrupted}: saved a checkpoint at step {step}; run the same command to resume", flush=True)
        return {"interrupted": interrupted, **summary}
    _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
