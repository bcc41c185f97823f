"""Numpy arrays in one shared-memory segment, shared with worker processes.

On Linux the segment is anonymous memory made by ``memfd_create``: it has no name in
``/dev/shm`` and the kernel frees it when the last process holding it (its descriptor
or a map of it) goes away, however they end, a whole process group killed by
``SIGKILL`` or an out-of-memory kill included: nothing can leak. Forked workers
inherit the map; a spawned worker receives ``(owner pid, descriptor)`` and opens
``/proc/<pid>/fd/<fd>``, which works while the owner lives (it owns the source the
worker reads).

Where ``memfd_create`` is missing, the segment is a named POSIX segment made through
:class:`multiprocessing.shared_memory.SharedMemory`, which registers it with Python's
resource tracker (unlinked if the owner is killed, unless the tracker is killed too).
A normal exit or an exception unlinks it through a finalizer. Other processes attach
read-only by mapping it directly, so they never register it themselves.

The layout keeps each array's full dtype as a ``numpy.lib.format`` descriptor (plain
strings, lists and tuples that survive pickling and JSON): compound dtypes keep their
fields, offsets and padding, so attached arrays carry the same dtype as the owner's.
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from ._errors import DataError

_ALIGN = 64


def _descr(dtype: np.dtype) -> Any:
    """A plain-data descriptor of ``dtype`` (fields, offsets and padding included)."""
    with warnings.catch_warnings():  # dtype metadata (e.g. h5py's enum names) is not kept
        warnings.simplefilter("ignore", UserWarning)
        return np.lib.format.dtype_to_descr(dtype)


def _dtype(descr: Any) -> np.dtype:
    """The dtype a descriptor from :func:`_descr` stands for."""
    return np.lib.format.descr_to_dtype(descr)


def _unlink(shm: shared_memory.SharedMemory, owner: int) -> None:
    if os.getpid() != owner:  # a forked child inherits the finalizer; only the owner unlinks
        return
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class SharedArrays:
    """Named arrays in one segment; ``share=False`` keeps them in private memory."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], np.dtype]], *, share: bool = True) -> None:
        self.layout: dict[str, tuple[int, tuple[int, ...], Any]] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            if dtype.hasobject:
                raise TypeError(f"shared memory cannot hold Python objects: array {name!r} has dtype {dtype}")
            if dtype.subdtype is not None:  # a subarray dtype: its shape joins the array's, as numpy does
                dtype, inner = dtype.subdtype
                shape = (*shape, *inner)
            shape = tuple(int(s) for s in shape)
            self.layout[name] = (offset, shape, _descr(dtype))
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.name: str | None = None
        # Where the memfd lives: (owner pid, descriptor, inode), in the owner and in every copy
        # attached to it (a copy may be pickled on again, e.g. by a worker that spawns its own).
        self._memfd: tuple[int, int, int] | None = None
        self._owner = False
        self._closed = False
        self._shm = None
        self._map: Any = None
        size = max(offset, 1)
        fd = _memfd(size) if share else None
        if fd is not None:
            try:
                buf = self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            self._memfd, self._owner = (os.getpid(), fd, os.fstat(fd).st_ino), True
            self.name = f"memfd:tandem_cache (pid {os.getpid()}, fd {fd})"
            self._finalizer = weakref.finalize(self, _close_fd, fd)
        elif share:
            # Created through SharedMemory so the resource tracker knows it, but mapped
            # by hand: SharedMemory's own buffer refuses to close while numpy views live.
            self._shm = shared_memory.SharedMemory(create=True, size=size)
            self._shm.close()
            self.name = self._shm.name
            self._finalizer = weakref.finalize(self, _unlink, self._shm, os.getpid())
            buf = self._map = map_segment(self.name, size, writable=True)
        else:
            buf = bytearray(size)
        self.arrays = self._views(buf)

    def _views(self, buf) -> dict[str, np.ndarray]:
        out = {}
        for name, (offset, shape, descr) in self.layout.items():
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(buf, dtype=_dtype(descr), count=count, offset=offset).reshape(shape)
        return out

    def freeze(self) -> None:
        """Make the arrays read-only (after loading)."""
        for arr in self.arrays.values():
            arr.flags.writeable = False

    def close(self) -> None:
        """Release the segment (the memory is freed once no process maps it) and drop this process's views."""
        self.arrays = {}
        if self._shm is not None or self._owner:
            self._finalizer()
            self._shm, self._owner = None, False
        self._map = None
        self._closed = True

    def __getstate__(self) -> dict[str, Any]:
        if self._closed:
            raise DataError(f"shared arrays {self.name or ''} were closed: they cannot be sent to another process")
        state = {"layout": self.layout, "nbytes": self.nbytes, "name": self.name, "memfd": self._memfd}
        if self.name is None:
            state["arrays"] = self.arrays
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.layout, self.nbytes, self.name = state["layout"], state["nbytes"], state["name"]
        self._shm, self._memfd, self._owner, self._closed = None, state.get("memfd"), False, False
        size = max(self.nbytes, 1)
        if self.name is None:
            self.arrays = state["arrays"]
            return
        if state.get("memfd") is not None:
            self._map = _map_memfd(*state["memfd"], size)
        else:
            self._map = map_segment(self.name, size, writable=False)
        self.arrays = self._views(self._map)


def _memfd(size: int) -> int | None:
    """A memfd of ``size`` bytes, or None where the system has none (then a named segment is used)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("tandem_cache", os.MFD_CLOEXEC)
    except OSError:  # e.g. refused by a seccomp profile or a sandboxed kernel
        return None
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _map_memfd(pid: int, fd: int, inode: int, size: int) -> mmap.mmap:
    """Map another process's memfd read-only, through ``/proc/<pid>/fd/<fd>`` (checked to be
    the same file: a closed descriptor's number may have been reused)."""
    try:
        local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    except OSError as e:
        raise DataError(
            f"the shared memory of a cached source is gone or unreachable (/proc/{pid}/fd/{fd}: {e.strerror}): "
            f"the process that loaded the cache (pid {pid}) has exited, or this system forbids opening "
            "another process's descriptors"
        ) from e
    try:
        if os.fstat(local).st_ino != inode:
            raise DataError(f"the shared memory of a cached source is gone: the process that loaded it (pid {pid}) closed it")
        return mmap.mmap(local, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(local)


def map_segment(name: str, size: int, *, writable: bool) -> mmap.mmap:
    """Map ``/dev/shm/<name>`` without registering it with Python's resource tracker."""
    try:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError as e:
        raise DataError(f"shared memory {name!r} is gone: the process that loaded the cache has exited") from e
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)
