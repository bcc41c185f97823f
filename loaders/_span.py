"""Many files mapped back to back into one address range, read as one numpy array.

A batch drawn at random from a sharded dataset touches many shards. With one memory
map per shard, gathering its records costs a few numpy calls per shard touched; with
all shards mapped into one reserved range (each at a page-aligned base), a field of
the whole batch is one fancy-indexing call over one array, whatever the shard count.

Linux and macOS only (``mmap`` with ``MAP_FIXED`` through libc); :func:`map_span`
returns None where that is not available, and readers keep one map per file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import weakref
from collections.abc import Sequence

import numpy as np

from ._bytes import ByteWindows

MAX_FILES = 16_384  # each file is one kernel mapping; Linux allows ~65k per process by default

_PROT_NONE, _PROT_READ = 0, 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED = 0x01, 0x02, 0x10
_MAP_ANONYMOUS = 0x20 if sys.platform.startswith("linux") else 0x1000
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0
_FAILED = ctypes.c_void_p(-1).value


def _libc():
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


class Span:
    """Files ``paths`` mapped read-only, whole, file ``k`` at ``bases[k]`` (``sizes[k]`` bytes).

    ``windows`` gives byte windows over the whole range; bytes between a file's end
    and the next base read as zeros. The range is unmapped once no numpy view of it
    is left; arrays gathered out of it are copies.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        page = mmap.PAGESIZE
        sizes = [os.stat(p).st_size for p in paths]
        self.sizes = np.asarray(sizes, dtype=np.int64)
        rounded = [max(page, -(-int(n) // page) * page) for n in sizes]
        self.bases = np.concatenate([[0], np.cumsum(rounded)[:-1]]).astype(np.int64)
        total = int(sum(rounded))
        addr = _LIBC.mmap(None, total, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr in (None, _FAILED):
            raise OSError(ctypes.get_errno(), f"cannot reserve {total} bytes of address space")
        try:
            for path, base, size in zip(paths, self.bases, sizes, strict=True):
                if not size:
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    got = _LIBC.mmap(addr + int(base), int(size), _PROT_READ, _MAP_SHARED | _MAP_FIXED, fd, 0)
                finally:
                    os.close(fd)
                if got != addr + int(base):
                    raise OSError(ctypes.get_errno(), f"{path}: cannot map it ({size} bytes)")
        except BaseException:
            _LIBC.munmap(addr, total)
            raise
        buf = (ctypes.c_uint8 * total).from_address(addr)
        # Unmapped when the last numpy view of it is gone (every view holds ``buf`` as its base).
        weakref.finalize(buf, _LIBC.munmap, addr, total)
        array = np.frombuffer(buf, dtype=np.uint8)
        array.flags.writeable = False
        self.windows = ByteWindows(array)


def map_span(paths: Sequence[str]) -> Span | None:
    """One :class:`Span` over ``paths``, or None where it cannot be made (other OS, too many
    files, no address space): the caller then maps each file on its own."""
    if _LIBC is None or not 0 < len(paths) <= MAX_FILES:
        return None
    try:
        return Span(paths)
    except OSError:
        return None
