"""Feeding JAX devices: this process's part of the data, host batches split per device, batches kept in flight.

Needs JAX only (neither Grain nor torch): whichever adapter reads the batches, this
module puts them where ``pmap`` (or a sharded ``jit``) takes them.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from loaders import ProcessPart

from ._common import require

AXIS = "devices"  # the one mesh axis: local devices, batches split along their first dimension


def sharding(devices: list) -> Any:
    """Arrays split along their first axis over ``devices``, one slice each: what ``pmap`` takes and returns."""
    jax = require("jax", "JAX")
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))


def process_part(mode: str = "global") -> ProcessPart:
    """This JAX process's :class:`ProcessPart` (``jax.process_index()`` of ``jax.process_count()``)."""
    jax = require("jax", "JAX")
    return ProcessPart(jax.process_index(), jax.process_count(), mode)


def split_for_devices(batch: dict[str, Any], num_devices: int) -> dict[str, Any]:
    """Reshape each array of a host batch to ``(num_devices, per_device, ...)`` for ``pmap``."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, np.ndarray):
            raise TypeError(f"batch key {k!r} is a {type(v).__name__}, not an array: it cannot go to devices")
        if v.shape[0] % num_devices:
            raise ValueError(
                f"batch key {k!r} has {v.shape[0]} records, which do not split over {num_devices} devices: "
                f"use a per-process batch size that is a multiple of {num_devices}"
            )
        out[k] = v.reshape(num_devices, v.shape[0] // num_devices, *v.shape[1:])
    return out


def device_batches(
    batches: Iterable[dict[str, Any]],
    *,
    devices: list | None = None,
    size: int = 2,
    thread: bool = False,
    copy: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Split each host batch over the local devices and keep ``size`` batches in flight there.

    Reading runs ahead of the batch handed out: feed it ``adapter.iter_from(step)`` and save
    ``LoaderState.create(trained_step, ...)`` yourself, not the adapter's state, which
    counts the batches read ahead too.

    Each array becomes ``(len(devices), per_device, ...)``, ready for ``pmap``; with
    ``copy`` it is also copied to the devices ahead of use, as a ``jax.Array`` sharded
    along its first axis over ``devices`` (default ``jax.local_devices()``). ``copy``
    defaults to True on accelerators, where the copy overlaps the steps running, and
    False on CPU devices, whose memory is host memory: there ``pmap`` takes the numpy
    arrays for ~5 us a batch, where ``jax.device_put`` costs ~30 us an array (measured,
    jax 0.10). Errors from the host iterator are raised here, after the batches read
    before them.

    By default the next batches are read in the calling thread, ``size`` ahead of the
    one handed out: JAX dispatches steps asynchronously, so this work runs while the
    devices compute the steps already queued, and no thread competes with the training
    loop for the GIL (on a 2-core machine a feeder thread cost 5-25% of the step rate,
    measured). ``thread=True`` reads in a background thread instead: worth it only when
    reading a batch in this process takes longer than a step and releases the GIL
    (decompression, slow disks).
    """
    jax = require("jax", "JAX")
    devices = list(devices or jax.local_devices())
    if copy is None:
        copy = any(d.platform != "cpu" for d in devices)
    placement = sharding(devices) if copy else None

    def place(batch: dict[str, Any]) -> dict[str, Any]:
        split = split_for_devices(batch, len(devices))
        return jax.device_put(split, placement) if copy else split

    if not thread:
        return _placed_ahead(map(place, batches), max(1, size))
    return _threaded(map(place, batches), max(1, size))


def _placed_ahead(placed: Iterator[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """Hand out batches ``size`` behind the reading; an error is raised after the batches read before it."""
    ahead: collections.deque = collections.deque()
    error: BaseException | None = None
    while True:
        while error is None and len(ahead) <= size:
            try:
                ahead.append(next(placed))
            except StopIteration:
                error = StopIteration()
            except Exception as e:  # raised once the batches before it are handed out
                error = e
        if not ahead:
            break
        yield ahead.popleft()
    if not isinstance(error, StopIteration):
        raise error


def _threaded(placed: Iterator[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    ready: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in placed:
                if stop.is_set():
                    return
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as e:  # handed to the consumer
            ready.put(e)

    worker = threading.Thread(target=fill, name="tandem-device-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Wait for the thread to leave JAX and the adapter: a daemon thread still inside
        # native code when the interpreter exits aborts the process.
        worker.join(timeout=30)
