"""Many files mapped back to back into one address range, read as one numpy array.

A batch drawn at random from a sharded dataset touches many shards. With one memory
map per shard, gathering its records costs a few numpy calls per shard touched; with
all shards mapped into one reserved range (each at a page-aligned base), a field of
the whole batch is one fancy-indexing call over one array, whatever the shard count.

Linux and macOS only (``mmap`` with ``MAP_FIXED`` through libc). The flags come from
Python's ``mmap`` module where it has them; the three it lacks (``MAP_FIXED``,
``MAP_NORESERVE`` before Python 3.13, ``PROT_NONE``) from a table of the platforms
whose system headers were checked. Elsewhere :func:`map_span` returns None, and
readers keep one map per file.

:func:`map_file` maps one file the same way (through libc, its descriptor closed at once),
so a reader may keep many files mapped, past the number a span holds, with no
descriptor held open per file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import sys
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._bytes import ByteWindows

MAX_FILES = 16_384  # each file is one kernel mapping; Linux allows ~65k per process by default

_FAILED = ctypes.c_void_p(-1).value

# What Python's mmap module lacks: (MAP_FIXED, MAP_NORESERVE, PROT_NONE), per (sys.platform, machine).
# Linux: asm-generic/mman-common.h (MAP_FIXED 0x10, PROT_NONE 0) and asm-generic/mman.h (MAP_NORESERVE
# 0x4000), which x86, arm and arm64 include as they are (other architectures differ: mips, powerpc,
# sparc, alpha, parisc). macOS: sys/mman.h (MAP_FIXED 0x0010, MAP_NORESERVE 0x0040, PROT_NONE 0x00).
_LINUX_GENERIC = (0x10, 0x4000, 0x0)
_DARWIN = (0x10, 0x40, 0x0)
_MISSING_FLAGS = {
    **{("linux", m): _LINUX_GENERIC for m in ("x86_64", "aarch64", "armv6l", "armv7l", "armv8l")},
    ("darwin", "x86_64"): _DARWIN,
    ("darwin", "arm64"): _DARWIN,
}


class _Flags(NamedTuple):
    prot_none: int
    prot_read: int
    reserve: int  # flags of the reserved range: private, anonymous, no swap reserved
    file: int  # flags of each file's map: shared, at the fixed address given


def mmap_flags() -> _Flags | None:
    """The mmap flags a span needs on this platform, or None where some are unknown: then
    no span is made, rather than one made with guessed flags."""
    missing = _MISSING_FLAGS.get((sys.platform, platform.machine()))
    if missing is None or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    fixed, noreserve, prot_none = missing
    noreserve = getattr(mmap, "MAP_NORESERVE", noreserve)  # Python 3.13+ has it
    return _Flags(prot_none, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve, mmap.MAP_SHARED | fixed)


def _libc():
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    # off_t is a C long under both libcs here (glibc's mmap without _FILE_OFFSET_BITS=64, and LP64)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
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

    def __init__(self, paths: Sequence[str], flags: _Flags) -> None:
        page = mmap.PAGESIZE
        sizes = [os.stat(p).st_size for p in paths]
        self.sizes = np.asarray(sizes, dtype=np.int64)
        rounded = [max(page, -(-int(n) // page) * page) for n in sizes]
        self.bases = np.concatenate([[0], np.cumsum(rounded)[:-1]]).astype(np.int64)
        total = int(sum(rounded))
        addr = _LIBC.mmap(None, total, flags.prot_none, flags.reserve, -1, 0)
        if addr in (None, _FAILED):
            raise OSError(ctypes.get_errno(), f"cannot reserve {total} bytes of address space")
        try:
            for path, base, size in zip(paths, self.bases, sizes, strict=True):
                if not size:
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    got = _LIBC.mmap(addr + int(base), int(size), flags.prot_read, flags.file, fd, 0)
                finally:
                    os.close(fd)
                if got != addr + int(base):
                    raise OSError(ctypes.get_errno(), f"{path}: cannot map it ({size} bytes)")
        except BaseException:
            _LIBC.munmap(addr, total)
            raise
        self.windows = ByteWindows(_array_at(addr, total))


def _array_at(addr: int, length: int) -> np.ndarray:
    """A read-only numpy view of the ``length`` mapped bytes at ``addr``; unmapped when the last
    numpy view of it is gone (every view holds ``buf`` as its base)."""
    buf = (ctypes.c_uint8 * length).from_address(addr)
    weakref.finalize(buf, _LIBC.munmap, addr, length)
    array = np.frombuffer(buf, dtype=np.uint8)
    array.flags.writeable = False
    return array


def map_file(path: str) -> np.ndarray:
    """The whole of file ``path``, mapped read-only, as a ``uint8`` array.

    Through libc where there is one: the descriptor is closed as soon as the file is mapped,
    so keeping thousands of such maps holds no descriptor open. Elsewhere Python's ``mmap``
    (which keeps one). An empty file gives an empty array (``mmap`` refuses length 0).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        if _LIBC is None:
            return np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), dtype=np.uint8)
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"{path}: cannot map it ({size} bytes): {os.strerror(err)}")
    finally:
        os.close(fd)
    return _array_at(addr, size)


def map_span(paths: Sequence[str]) -> Span | None:
    """One :class:`Span` over ``paths``, or None where it cannot be made (other OS, unknown
    mmap flags, too many files, no address space): the caller then maps each file on its own."""
    flags = mmap_flags()
    if _LIBC is None or flags is None or not 0 < len(paths) <= MAX_FILES:
        return None
    try:
        return Span(paths, flags)
    except OSError:
        return None
