"""Everything about devices, in one file: pmap over the devices of every process, replicate, unreplicate.

A later move to ``jit`` with shardings touches only this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from adapters.jax import AXIS, sharding


def local_devices(count: int | None = None) -> list:
    """This process's first ``count`` devices (default: all of them)."""
    devices = jax.local_devices()
    if count is None:
        return devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"train.devices={count}, but this process has {len(devices)} local device(s)")
    return devices[:count]


def global_devices(count: int | None = None) -> list:
    """Every process's first ``count`` devices: what ``pmap`` spans, so its collectives reach all
    processes (each process feeds its own local ones). The local ones alone in a one-process run."""
    if jax.process_count() == 1:
        return local_devices(count)
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    fewest = min(len(v) for v in by_process.values())
    if count is None and fewest != max(len(v) for v in by_process.values()):
        counts = {p: len(v) for p, v in sorted(by_process.items())}
        raise ValueError(f"the processes have different numbers of devices ({counts}, by process): "
                         f"set train.devices (at most {fewest}) so that each feeds as many")
    if count is not None and not 1 <= count <= fewest:
        raise ValueError(f"train.devices={count}, but a process of this run has {fewest} local device(s)")
    return [d for p in sorted(by_process) for d in by_process[p][: count or None]]


def replicate(tree: Any, devices: list) -> Any:
    """A copy of ``tree`` on every device (leading axis = device), placed as pmap places its outputs,
    so the first step and every later one see the same input shardings (one compilation)."""
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))).copy(), tree)
    return jax.device_put(stacked, sharding(devices))


def first_replica(x: Any) -> np.ndarray:
    """This process's first device's slice of a ``pmap`` output (or of a host array), as numpy.

    Read from the local shard itself: indexing (``x[0]``) would run a computation over the
    array's devices, which in a multi-process run spans every process, and deadlocks when the
    processes do not run it at the same moment (seen: one indexing, the other in a barrier).
    """
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]


def unreplicate(tree: Any) -> Any:
    """The first local device's copy of a replicated tree, on the host (every copy is the same)."""
    return jax.tree.map(first_replica, tree)


def pmapped(fn: Callable, devices: list, donate: tuple[int, ...] = ()) -> Callable:
    """``fn`` run on every device, collectives over the axis named ``AXIS``."""
    return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate)


def pmean(tree: Any) -> Any:
    return jax.lax.pmean(tree, AXIS)


def psum(tree: Any) -> Any:
    return jax.lax.psum(tree, AXIS)


def device_index() -> jax.Array:
    return jax.lax.axis_index(AXIS)
