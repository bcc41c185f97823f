"""Joining a multi-process run (``jax.distributed``), and noticing when a process of it is lost.

``initialize`` calls :func:`jax.distributed.initialize` — with the coordinator, the
process count and this process's index when given, else with nothing, so JAX detects
the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes). On CPU it selects gloo
collectives first, without which no computation spans processes.

A process that dies (``kill -9``, a lost host) leaves the others blocked inside a
collective. JAX's coordination service notices after its heartbeat timeout and aborts
them with a C++ stack trace; before that, :class:`Watchdog` notices: every process
bumps a counter in the coordination service's key-value store each second, and a
process whose counter has not moved for ``lost_after`` seconds (or a coordinator that
no longer answers) ends this process with one clear line naming the lost process and
the checkpoint to resume from. JAX's own timeout is set past ours, as a backstop.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LOST_EXIT = 3  # the exit status of a process that ends because another one was lost
HEARTBEAT_S = 1.0
_KEYS = "tandem/"  # this module's keys in the coordination service's key-value store


@dataclass(frozen=True)
class Launch:
    """How this process joins a run: nothing (one process), explicit, or detected by JAX (``auto``)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    lost_after: float = 60.0

    @property
    def wanted(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def check(self) -> None:
        """A one-line ``ValueError`` for an incomplete or inconsistent launch."""
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if not self.auto and any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError("a multi-process run needs all three of --coordinator HOST:PORT, --num-processes N "
                             "and --process-id I (or --distributed, to let JAX detect SLURM / Open MPI / TPU pods)")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.num_processes is not None and self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.coordinator is not None and ":" not in self.coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if not self.lost_after > 0:
            raise ValueError(f"--lost-after must be > 0 seconds, got {self.lost_after}")


_watchdog: Watchdog | None = None  # this process's, once it has joined a multi-process run


def initialize(launch: Launch) -> Watchdog | None:
    """Join the run ``launch`` describes and start its :class:`Watchdog` (None for a one-process run)."""
    global _watchdog
    if not launch.wanted:
        return None
    launch.check()
    import jax

    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        launch.coordinator, launch.num_processes, launch.process_id,
        heartbeat_timeout_seconds=int(launch.lost_after) + 30,  # JAX's abort comes after our clear error
    )
    if jax.process_count() == 1:
        return None
    _watchdog = Watchdog(jax.process_index(), jax.process_count(), launch.lost_after).start()
    return _watchdog


def describe(where: Callable[[], str]) -> None:
    """What a lost-process error says about this process (e.g. its step and the checkpoint to resume)."""
    if _watchdog is not None:
        _watchdog.describe(where)


def finish() -> None:
    """This process's training is over: it is no longer watched, nor watches the others."""
    if _watchdog is not None:
        _watchdog.finish()


def await_verdict() -> None:
    """Give the watchdog time to find a lost or failed process (it then ends this one, naming it): what
    a failed collective usually means. Returns if it finds none within ``lost_after``."""
    if _watchdog is not None:
        deadline = time.monotonic() + _watchdog.lost_after + 3 * HEARTBEAT_S
        while time.monotonic() < deadline and _watchdog.watching():
            time.sleep(0.1)


def fail(message: str, code: int) -> None:
    """End this process of a multi-process run now, with exit status ``code``, after telling the others
    ``message`` (they stop at once, naming it). Skips JAX's exit-time shutdown barrier, which would
    wait minutes for processes still blocked in a collective."""
    if _watchdog is not None:
        _watchdog.fail(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def process_count() -> int:
    """How many processes the run has (1 unless this process joined a multi-process run)."""
    import jax

    return jax.process_count()


def process_label() -> str:
    """``"[process i/n] "`` for a process other than process 0, else ``""``: the prefix of its lines."""
    import jax

    return f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_index() else ""


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, summary, progress bar): process 0."""
    import jax

    return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 600) -> None:
    """Wait until every process reaches ``name`` (nothing to wait for in a one-process run).

    Through the coordination service, not a device computation (``sync_global_devices``): a
    collective queued on the devices can deadlock with other work in flight there."""
    import jax

    if jax.process_count() > 1:
        _client().wait_at_barrier(f"{_KEYS}{name}", int(timeout_s * 1000))


class Watchdog:
    """Heartbeats through JAX's coordination service; ends this process when another stops beating
    or reports a failure (:func:`fail`).

    One ``key_value_dir_get`` a second reads every process's beat, so the load on the
    coordinator grows with the process count, not its square. The beat comes from a Python
    thread: a process holding the GIL in one C call for longer than ``lost_after`` (XLA
    compiles and HDF5 reads release it) would look lost, so keep ``lost_after`` well above that.

    ``where`` is called for the message's context (e.g. the step and the checkpoint to
    resume from); set it with :meth:`describe`, and keep it cheap and free of locks.
    """

    def __init__(self, index: int, count: int, lost_after: float, *, exit: Callable[[int], None] = os._exit) -> None:
        self.index, self.count, self.lost_after = index, count, lost_after
        self._exit = exit
        self._where: Callable[[], str] = lambda: ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-watchdog", daemon=True)

    def describe(self, where: Callable[[], str]) -> None:
        self._where = where

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def watching(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def finish(self) -> None:
        """This process is done: say so to the others, and stop watching them."""
        self.stop()
        self._publish("done", "1")

    def fail(self, message: str) -> None:
        """This process failed with ``message``: tell the others (they end at once, naming it), stop beating."""
        self.stop()
        self._publish("failed", message[:500])

    def _publish(self, what: str, value: str) -> None:
        try:
            _client().key_value_set(f"{_KEYS}{what}/{self.index}", value, allow_overwrite=True)
        except Exception:  # the others may be gone already: nothing left to tell them
            pass

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException as e:  # never die quietly: a watchdog that stops watching leaves hangs
            self._lost(f"the watchdog failed ({type(e).__name__}: {e})")

    def _watch(self) -> None:
        client = _client()
        beat = 0
        now = time.monotonic()
        seen = {p: (None, now) for p in range(self.count) if p != self.index}  # last beat, since when (our clock)
        unanswered_since: float | None = None
        while not self._stop.wait(HEARTBEAT_S):
            beat += 1
            now = time.monotonic()
            try:
                client.key_value_set(f"{_KEYS}beat/{self.index}", str(beat), allow_overwrite=True)
                entries = dict(client.key_value_dir_get(_KEYS))
                unanswered_since = None
            except Exception as e:  # the coordination service (in process 0) does not answer
                if self._stop.is_set():
                    return
                unanswered_since = unanswered_since or now
                if now - unanswered_since > self.lost_after:
                    first = str(e).splitlines()[0][:200] if str(e) else ""
                    self._lost(f"the coordination service (in process 0 of {self.count}) has not answered for "
                               f"{now - unanswered_since:.0f} s ({type(e).__name__}: {first})")
                continue
            for other, (last, since) in list(seen.items()):
                failed = entries.get(f"{_KEYS}failed/{other}")
                if failed is not None:
                    self._lost(f"process {other} of {self.count} failed: {failed}")
                if f"{_KEYS}done/{other}" in entries:
                    del seen[other]
                    continue
                value = entries.get(f"{_KEYS}beat/{other}")
                if value != last:
                    seen[other] = (value, now)
                elif now - since > self.lost_after:
                    self._lost(f"process {other} of {self.count} stopped responding (no heartbeat for {now - since:.0f} s)")

    def _lost(self, what: str) -> None:
        try:
            where = self._where()
        except Exception:
            where = ""
        try:
            print(f"\nerror: {what}; process {self.index} stops{' ' + where if where else ''}. Start every process "
                  "again with the same command (without --fresh) to resume from the last checkpoint.",
                  file=sys.stderr, flush=True)
            if self.index == 0:  # the coordination service ends with this process: let the others say why first
                time.sleep(2 * HEARTBEAT_S)
        finally:
            self._exit(LOST_EXIT)


def _client():
    from jax._src import distributed  # JAX's one handle on the coordination service's client

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client
