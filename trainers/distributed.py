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
        return self.auto or self.coordinator is not None or self.num_processes is not None

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


def process_label() -> str:
    """``"[process i/n] "`` for a process other than process 0, else ``""``: the prefix of its lines."""
    import jax

    return f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_index() else ""


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, summary, progress bar): process 0."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (nothing to wait for in a one-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Watchdog:
    """Heartbeats through JAX's coordination service; ends this process when another stops beating.

    ``where`` is called for the message's context (e.g. the step and the checkpoint to
    resume from); set it with :meth:`describe`. ``finish()`` marks this process as done
    (a finished process is not lost) and stops the thread.
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

    def finish(self) -> None:
        """This process is done: say so to the others, and stop watching them."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            _client().key_value_set(f"tandem/done/{self.index}", "1", allow_overwrite=True)
        except Exception:  # the others may be gone already: nothing left to tell them
            pass

    def _run(self) -> None:
        client = _client()
        beat = 0
        seen: dict[int, tuple[str | None, float]] = {}  # per process: its last beat, and since when (our clock)
        done: set[int] = set()
        while not self._stop.wait(HEARTBEAT_S):
            beat += 1
            try:
                client.key_value_set(f"tandem/beat/{self.index}", str(beat), allow_overwrite=True)
                now = time.monotonic()
                for other in range(self.count):
                    if other == self.index or other in done:
                        continue
                    if _try_get(client, f"tandem/done/{other}") is not None:
                        done.add(other)
                        continue
                    value = _try_get(client, f"tandem/beat/{other}")
                    last, since = seen.get(other, (None, now))
                    if value != last:
                        seen[other] = (value, now)
                    elif now - since > self.lost_after:
                        self._lost(f"process {other} of {self.count} stopped responding (no heartbeat for "
                                   f"{now - since:.0f} s)")
                        return
            except Exception as e:  # the coordination service (in process 0) is gone
                if self._stop.is_set():
                    return
                self._lost(f"the coordinator (process 0 of {self.count}) no longer answers "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
                return

    def _lost(self, what: str) -> None:
        where = self._where()
        print(f"\nerror: {what}; process {self.index} stops{' ' + where if where else ''}. Start every process "
              "again with the same command to resume from the last checkpoint.", file=sys.stderr, flush=True)
        self._exit(LOST_EXIT)


def _client():
    from jax._src import distributed  # JAX's one handle on the coordination service's client

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def _try_get(client, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # NOT_FOUND: not set yet
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise
