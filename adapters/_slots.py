"""Handing whole batches from worker processes to the main process through reused shared memory.

A framework's default hand-off moves every batch into a fresh shared-memory segment
(create, map, send a descriptor, map again, unlink): on small machines that costs
as much as reading the batch. Here each worker owns a ring of segments, created
once; it copies a batch into the next slot and sends only a small :class:`SlotRef`.
The main process copies the arrays out of its read-only map of that slot.

Segments are plain files in ``/dev/shm`` created without Python's resource tracker:
a forked worker must take no lock that another thread of its parent might have
held at the fork. The worker unlinks its segments when it exits (also when it
notices its parent died); the main process drops its maps of a stream's segments
when the stream ends (so exited workers' memory is not pinned across epochs) and
unlinks every segment of its loader (one name prefix per loader) when the loader
goes away. When every process is killed at once (a process group killed by
``SIGKILL``, an out-of-memory kill), none of that runs: each worker therefore holds
a ``flock`` on its segments, which the kernel drops when it dies, and every new
loader first removes the segments nobody holds (:func:`sweep`).

A slot is reused only ``slots`` batches later. Each slot starts with a sequence
number that the worker sets to -1 while writing; the reader checks it before and
after copying, so a slot overwritten too early is an error, never a wrong batch
(on x86-64; see below).

Why that holds, and where. The worker stores -1, then the batch, then the new
sequence number; the reader loads the number, then the batch, then the number
again. If any value the reader copied came from an overwrite, the worker's -1 was
stored before it, so the second load sees -1 or a later number, not the one
expected; and a reader that sees the expected number first sees the batch stored
before it. This needs (1) each process's stores to become visible to the other in
program order, and (2) the reader's loads not to be reordered with one another
(and the 8-byte aligned number to be stored and loaded whole). x86-64 guarantees
all of it (total store order: the only reordering it allows is a load passing an
earlier store, which neither side relies on; numpy's copies are ordinary stores,
or glibc memcpy's non-temporal ones for large blocks, which it fences before it
returns). ARM and POWER do not: without memory barriers, which Python cannot
issue, the reader may see part of a new batch and still the old number, and would
return a wrong batch silently. So slots are used only on x86-64 (:func:`use_slots`);
elsewhere the adapters keep their framework's own hand-off, which synchronizes
through the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import uuid
from collections import OrderedDict
from multiprocessing import util
from typing import Any, NamedTuple

import numpy as np

from loaders.shm import map_segment

_HEADER = 64
_ALIGN = 64
_WRITING = -1

ORDERED_MACHINES = ("x86_64", "AMD64", "amd64")  # platform.machine() of x86-64 (Linux/macOS, Windows, BSD)


def use_slots(shared_slots: bool | None) -> bool:
    """Whether workers hand batches over through slots: ``shared_slots`` as asked, ``None``
    meaning where the ordering argument above holds (x86-64) and ``/dev/shm`` exists (the
    slots are files there). ``True`` elsewhere raises."""
    machine = platform.machine()
    ordered = machine in ORDERED_MACHINES
    if shared_slots is None:
        return ordered and os.path.isdir("/dev/shm")
    if shared_slots and not os.path.isdir("/dev/shm"):
        raise ValueError("shared_slots=True needs /dev/shm (Linux), which this machine lacks: use None or False")
    if shared_slots and not ordered:
        raise ValueError(
            f"shared_slots=True needs an x86-64 machine, and this one is {machine!r}: the slots detect a batch "
            "overwritten while it is read only if each process's memory stores and loads stay in program order, "
            f"which x86-64 guarantees and {machine!r} does not without memory barriers (Python cannot issue them), "
            "so a wrong batch could pass unnoticed. Use shared_slots=None (here: the framework's own hand-off) or False."
        )
    return bool(shared_slots)


class _Layout(NamedTuple):
    """One batch in a slot: each array's (offset, shape, dtype), the other values, the key order."""

    arrays: dict[str, tuple[int, tuple[int, ...], str]]
    inline: dict[str, Any]
    order: tuple[str, ...]


class SlotRef(NamedTuple):
    """Where a batch (or, with ``many``, a list of batches) lies: segment, sequence number,
    and each array's place (tuples: cheap to pickle)."""

    name: str
    size: int
    seq: int
    layouts: tuple[_Layout, ...]
    many: bool


_CREATED: set[str] = set()  # this process's segments, for unlink_created()
_LOCKS: dict[str, int] = {}  # segment -> the descriptor holding its flock


def new_token() -> str:
    """A prefix for one loader's segments, so its owner can find and remove them all."""
    return f"{os.getpid()}x{uuid.uuid4().hex[:12]}"


def sweep() -> list[str]:
    """Remove the slot segments no running process holds (left by processes killed before
    they could clean up); returns their names.

    Each worker holds a shared ``flock`` on every segment it made, taken before the
    segment gets its name (see :func:`_create`) and dropped by the kernel when the
    process ends, however it ends: a segment whose exclusive lock can be taken is
    orphaned. Locks belong to the file, not to a pid, so this holds across containers
    and PID namespaces sharing ``/dev/shm``. Other users' segments are left alone.
    """
    if not os.path.isdir("/dev/shm"):
        return []
    removed = []
    for name in os.listdir("/dev/shm"):
        if not name.startswith("tandem_slot_"):
            continue
        try:
            fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except OSError:  # held by a live worker, or not ours to remove
            continue
        finally:
            os.close(fd)
    return removed


def _unlink(name: str) -> None:
    _CREATED.discard(name)
    lock = _LOCKS.pop(name, None)
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass
    if lock is not None:
        os.close(lock)


def unlink_created() -> None:
    """Remove every segment this process created (a worker about to end abruptly)."""
    for name in list(_CREATED):
        _unlink(name)


def unlink_token(token: str) -> None:
    """Remove every segment of one loader, whichever worker made it."""
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        if name.startswith(f"tandem_slot_{token}_"):
            _unlink(name)


def _create(token: str, size: int) -> str:
    name = f"tandem_slot_{token}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    fresh = f"/dev/shm/tandem_new_{name[len('tandem_slot_'):]}"  # named only once locked: sweep() never sees it unlocked
    fd = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # held while this process lives
        os.ftruncate(fd, size)
        os.rename(fresh, f"/dev/shm/{name}")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(fresh)
        raise
    _LOCKS[name] = fd
    _CREATED.add(name)
    util.Finalize(None, _unlink, args=(name,), exitpriority=10)  # runs when the worker process exits
    return name


class SlotWriter:
    """The worker side: a ring of ``slots`` segments, grown when a batch does not fit."""

    def __init__(self, slots: int, token: str) -> None:
        self.slots = slots
        self.token = token
        self.segments: list[tuple[str, int, Any] | None] = [None] * slots
        self.count = 0

    def put(self, batch: dict[str, Any]) -> SlotRef:
        """Copy one batch into the next slot."""
        return self._put([batch], many=False)

    def put_many(self, batches: list[dict[str, Any]]) -> SlotRef:
        """Copy several batches into the next slot (one hand-off for all)."""
        return self._put(batches, many=True)

    def _put(self, batches: list[dict[str, Any]], many: bool) -> SlotRef:
        layouts, offset = [], _HEADER
        for batch in batches:
            arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biufc"}
            places = {}
            for k, v in arrays.items():
                places[k] = (offset, v.shape, v.dtype.str)
                offset += -(-v.nbytes // _ALIGN) * _ALIGN
            layouts.append(_Layout(places, {k: v for k, v in batch.items() if k not in arrays}, tuple(batch)))
        i, seq = self.count % self.slots, self.count
        self.count += 1
        entry = self.segments[i]
        if entry is None or entry[1] < offset:
            size = 2 * offset if entry else offset  # grown segments get room to spare
            if entry is not None:
                _unlink(entry[0])
            name = _create(self.token, size)
            entry = (name, size, map_segment(name, size, writable=True))
            self.segments[i] = entry
        name, size, mm = entry
        header = np.frombuffer(mm, dtype=np.int64, count=1)
        header[0] = _WRITING
        for batch, layout in zip(batches, layouts, strict=True):
            for k, (o, shape, dtype) in layout.arrays.items():
                v = batch[k]
                np.frombuffer(mm, dtype=dtype, count=v.size, offset=o).reshape(shape)[...] = v
        header[0] = seq
        return SlotRef(name, size, seq, tuple(layouts), many)


class SlotReader:
    """The main-process side: maps segments read-only (cached) and copies batches out."""

    def __init__(self, token: str, max_open: int = 64) -> None:
        self.maps: OrderedDict[str, Any] = OrderedDict()
        self.max_open = max_open
        self.token = token
        sweep()

    def release(self) -> None:
        """Drop this process's maps (a stream ended: its workers unlink their segments as they
        exit, and a map kept here would pin the memory). Later batches map afresh."""
        self.maps.clear()

    def close(self) -> None:
        """Unlink every segment of this loader (workers unlink their own too; twice is harmless)."""
        self.maps.clear()
        unlink_token(self.token)

    def take(self, ref: SlotRef) -> dict[str, Any] | list[dict[str, Any]]:
        """The batch (a list of batches for :meth:`SlotWriter.put_many`), copied out of its slot."""
        mm = self.maps.get(ref.name)
        if mm is None or len(mm) < ref.size:
            mm = map_segment(ref.name, ref.size, writable=False)
            self.maps[ref.name] = mm
            if len(self.maps) > self.max_open:
                self.maps.popitem(last=False)
        header = np.frombuffer(mm, dtype=np.int64, count=1)
        self._check(header, ref, "before")
        batches = []
        for layout in ref.layouts:
            out = {}
            for k, (o, shape, dtype) in layout.arrays.items():
                count = int(np.prod(shape, dtype=np.int64))
                out[k] = np.frombuffer(mm, dtype=dtype, count=count, offset=o).reshape(shape).copy()
            out.update(layout.inline)
            batches.append({k: out[k] for k in layout.order})
        self._check(header, ref, "while")
        return batches if ref.many else batches[0]

    @staticmethod
    def _check(header: np.ndarray, ref: SlotRef, when: str) -> None:
        if int(header[0]) != ref.seq:
            raise RuntimeError(
                f"worker batch slot {ref.name} was overwritten {when} reading batch #{ref.seq} "
                f"(holds #{int(header[0])}); raise the number of slots"
            )
