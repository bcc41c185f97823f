"""Naming the file behind a bus error, and a cheap content digest of files.

Tandem reads tar shards and uncompressed HDF5 datasets through memory maps. If a
mapped file shrinks while it is mapped (rewritten in place, truncated by another
program, a network file system changing under us), touching a page past its new end
makes the kernel send ``SIGBUS``, which kills the process with a bare "Bus error"
and no hint of which file. Python cannot recover from it: a Python-level signal
handler only sets a flag, the faulting read runs again, and the process would spin.

So every process that maps a file registers it here (:func:`watch`), and the first
registration installs a C-level ``SIGBUS`` handler (a ctypes callback). It names the
watched files whose size changed since they were mapped, dumps the Python stack,
then restores the default action and returns: the read faults again and the process
dies of ``SIGBUS`` as before (exit status 135 in a shell, ``-7`` from ``subprocess``),
now with a message saying why. A handler installed before (faulthandler's, a
framework's) is restored and receives the signal next, so its report still comes.
The callback needs the GIL: a read that faulted with the GIL released waits for the
thread holding it (as any Python signal handling does); once running, an alarm
bounds the handler. Linux and macOS only; elsewhere nothing is installed.

Sources also compare sizes where it is cheap (when they map a file, and when a
process first opens one), so a file that changed *before* it is read gets a
:class:`DataError` instead.
"""

from __future__ import annotations

import ctypes
import faulthandler
import hashlib
import os
import signal
import sys
import threading

_WATCHED: dict[str, int] = {}  # path -> size when mapped, in this process
_LOCK = threading.Lock()
_INSTALLED_PID: int | None = None
_HANDLER = None  # the ctypes callback: must stay alive while installed
_PREVIOUS: int | None = None  # the handler ours replaced (None: the default action)
_ALARM_S = 10


def _after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def watch(path: str, size: int) -> None:
    """Register ``path`` (``size`` bytes when mapped) with this process's bus-error report."""
    with _LOCK:
        _WATCHED[os.path.abspath(path)] = int(size)
        if _INSTALLED_PID != os.getpid():
            _install()


def changed_files() -> list[str]:
    """One line per watched file whose size is not the one it had when mapped."""
    lines = []
    for path, size in list(_WATCHED.items()):
        try:
            now = f"now {os.stat(path).st_size} bytes"
        except OSError as e:
            now = f"now unreadable ({e.strerror})"
        if now != f"now {size} bytes":
            lines.append(f"  {path}: {size} bytes when mapped, {now}")
    return lines


def _report(signum: int) -> None:
    """The SIGBUS handler: say which mapped file changed, then let the fault kill the process."""
    try:
        if _LIBC is not None:
            _LIBC.alarm(_ALARM_S)  # whatever happens below, the process ends
        lines = changed_files()
        if lines:
            text = (f"tandem: bus error (SIGBUS) in process {os.getpid()}: a memory-mapped file changed "
                    "size while it was being read:\n" + "\n".join(lines) +
                    "\ntandem: data files must not be modified while a run reads them; restore the file "
                    "(or rebuild the dataset) and start the run again: it resumes from its last checkpoint.\n")
        else:
            text = (f"tandem: bus error (SIGBUS) in process {os.getpid()}; none of the {len(_WATCHED)} mapped "
                    "data files changed size (a full /dev/shm, a failing disk or a signal sent by another process "
                    "can also cause it).\n")
        os.write(2, text.encode("utf-8", "replace"))
        if _PREVIOUS is None:  # a handler before ours (e.g. faulthandler) prints its own stack
            faulthandler.dump_traceback(file=2, all_threads=False)
    finally:
        if _LIBC is not None:
            # Hand the signal on: to the previous handler, else the default action, which ends the
            # process. Raised again here, so a SIGBUS sent by kill(1) ends it too; a faulting read
            # would fault again anyway.
            _LIBC.signal(signal.SIGBUS, _PREVIOUS or 0)
            getattr(_LIBC, "raise")(signal.SIGBUS)


def _libc():
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    except OSError:
        return None
    getattr(libc, "raise").argtypes = [ctypes.c_int]
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.alarm.restype = ctypes.c_uint
    libc.alarm.argtypes = [ctypes.c_uint]
    return libc


_LIBC = _libc()


def _install() -> None:
    global _HANDLER, _INSTALLED_PID
    _INSTALLED_PID = os.getpid()
    if _LIBC is None or not hasattr(signal, "SIGBUS"):
        return
    global _PREVIOUS
    if _HANDLER is None:
        _HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)(_report)
    ours = ctypes.cast(_HANDLER, ctypes.c_void_p).value
    previous = _LIBC.signal(signal.SIGBUS, ours)
    if previous != ours:  # a forked child inherits ours: keep what it replaced in the parent
        _PREVIOUS = previous if previous not in (None, signal.SIG_IGN) else None


# --------------------------------------------------------------------------- content digest
_SAMPLE = 4096
_SAMPLES = 8  # blocks read per file: first, last and six between
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """A cheap digest of a file's content: its size and ``_SAMPLES`` blocks of 4 KiB at fixed
    fractions of it (first and last included). The same bytes anywhere give the same digest
    (moved or copied data still matches); different data of the same size almost always
    differs. Memoized per process by (path, size, mtime)."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(memo)
    if digest is None:
        h = hashlib.sha256(str(st.st_size).encode())
        last = max(st.st_size - _SAMPLE, 0)
        starts = sorted({last * k // (_SAMPLES - 1) for k in range(_SAMPLES)})
        with open(path, "rb") as f:
            for start in starts:
                h.update(os.pread(f.fileno(), _SAMPLE, start))
        digest = _DIGESTS[memo] = h.hexdigest()[:16]
    return digest


def files_digest(paths) -> str:
    """One digest over :func:`file_digest` of each of ``paths``, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(file_digest(path).encode())
    return h.hexdigest()[:16]
