"""Loader: the framework-free iterator of numpy batch dicts, resumable by step."""

from __future__ import annotations

import copy
import os
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._collate import stack_records
from ._sampler import Sampler, record_rng
from ._state import LoaderState

Batch = dict[str, Any]


def check_compatible(source: Any, sampler: Sampler) -> None:
    """Raise if ``sampler`` cannot drive ``source`` (size, or a cached rank's part)."""
    if len(source) != sampler.num_records:
        raise ValueError(
            f"the sampler is built for {sampler.num_records} records, the source has {len(source)}: {source!r}"
        )
    part = getattr(source, "part", None)
    if part is not None and part.count > 1:
        s = sampler.part
        if (s.mode, s.index, s.count) != (part.mode, part.index, part.count):
            raise ValueError(
                f"{source!r} holds only {part.mode} part {part.index}/{part.count}; "
                f"the sampler reads {s.mode} part {s.index}/{s.count}. Build both with the same ProcessPart."
            )


class Loader:
    """Batches of ``source`` in the order ``sampler`` decides, as numpy dicts.

    Args:
      source: anything with ``__len__``, ``read_batch(indices)`` and ``describe()``
        or ``__repr__`` (H5Source, H5CachedSource, TarSource, or your own).
      sampler: the :class:`Sampler` (its ``num_records`` must equal ``len(source)``).
      transform: ``fn(record, rng) -> record``, applied to each record, with
        ``rng`` a ``numpy.random.Generator`` derived from ``(seed, epoch, record)``:
        the same numbers in every worker and after every restart.
      collate: ``fn(list of records) -> batch`` (default: stack each key).
      prefetch: batches read ahead by background threads (0: read on demand).
      threads: threads for ``prefetch``.
      mask_key: with ``drop_remainder=False``, every batch carries this boolean key,
        ``False`` for padding.
      lookahead: for a source with a ``prefetch(batches)`` hook (a TarSource of remote or
        compressed shards): how many steps ahead its shards are fetched. The sampler is a
        pure function of the step, so :meth:`get_batch` hands the record indices of the
        next ``lookahead`` steps to ``source.prefetch`` from a background thread (a hook that
        returns False is not called again in that process). None: the source's own
        ``lookahead`` attribute (0 where it has none).

    Iterating yields batches from the current step to the sampler's end (forever when
    ``num_epochs`` is None). ``state_dict()`` counts batches handed out, not those
    prefetched; ``load_state_dict()`` moves to a saved step.

    Fetching ahead runs in the process that calls :meth:`get_batch`: with the torch adapter's
    or Grain's worker processes, each worker looks ahead from the steps it reads, and the
    shard cache's file locks make sure a shard is still downloaded once per node.
    """

    def __init__(
        self,
        source: Any,
        sampler: Sampler,
        transform: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None = None,
        collate: Callable[[list[dict[str, Any]]], Batch] | None = None,
        *,
        prefetch: int = 0,
        threads: int = 2,
        mask_key: str = "_valid",
        lookahead: int | None = None,
    ) -> None:
        check_compatible(source, sampler)
        self.source = source
        self.sampler = sampler
        self.transform = transform
        self.collate = collate
        self.prefetch = int(prefetch)
        self.threads = max(1, int(threads))
        self.mask_key = mask_key
        hook = getattr(source, "prefetch", None)
        steps = getattr(source, "lookahead", 0) if lookahead is None else lookahead
        self.lookahead = max(0, int(steps or 0)) if callable(hook) else 0
        self._ahead: _Lookahead | None = None
        self._ahead_pid: int | None = None
        self._ahead_lock = threading.Lock()
        self._step = 0
        check_cache_order(source, sampler)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.sampler.steps_per_epoch

    @property
    def step(self) -> int:
        """The next global step this loader hands out."""
        return self._step

    def get_batch(self, step: int) -> Batch:
        """Batch ``step``: a pure function of ``step`` (safe from any thread or process)."""
        if self.lookahead:
            self._lookahead().at(step)
        idx, mask = self.sampler.indices_and_mask(step)
        if self.transform is None and self.collate is None:
            batch = dict(self.source.read_batch(idx))
        else:
            batch = self._per_record(idx, self.sampler.epoch(step))
        if not self.sampler.drop_remainder:
            batch[self.mask_key] = np.ones(len(idx), dtype=bool) if mask is None else mask
        return batch

    def _per_record(self, idx: np.ndarray, epoch: int) -> Batch:
        read = getattr(self.source, "read_records", None)
        records = read(idx) if read else [self.source[int(i)] for i in idx]
        if self.transform is not None:
            seed = self.sampler.seed
            records = [self.transform(r, record_rng(seed, epoch, int(i))) for r, i in zip(records, idx, strict=True)]
        return (self.collate or stack_records)(records)

    def _done(self, step: int) -> bool:
        total = self.sampler.total_steps
        return total is not None and step >= total

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            while not self._done(self._step):
                batch = self.get_batch(self._step)
                self._step += 1
                yield batch
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="tandem-prefetch") as pool:
            pending: deque = deque()
            expected = submitted = self._step
            while True:
                if self._step != expected:  # load_state_dict() during iteration: start over there
                    for fut in pending:
                        fut.cancel()
                    pending.clear()
                    expected = submitted = self._step
                while len(pending) < self.prefetch and not self._done(submitted):
                    pending.append(pool.submit(self.get_batch, submitted))
                    submitted += 1
                if not pending:
                    return
                batch = pending.popleft().result()
                self._step = expected = expected + 1
                yield batch

    def _lookahead(self) -> _Lookahead:
        """This process's lookahead thread (started the first time it is needed in a process)."""
        pid = os.getpid()
        if self._ahead_pid != pid:
            with self._ahead_lock:
                if self._ahead_pid != pid:
                    ahead = _Lookahead(self.source.prefetch, self.sampler, self.lookahead)
                    weakref.finalize(self, ahead.close)
                    self._ahead, self._ahead_pid = ahead, pid
        return self._ahead

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_ahead=None, _ahead_pid=None, _ahead_lock=None)  # threads do not cross processes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ahead_lock = threading.Lock()

    def state_dict(self) -> dict[str, Any]:
        """The resume state: a JSON-serializable dict (see :class:`LoaderState`)."""
        return LoaderState.create(self._step, self.source, self.sampler).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; raises if it was saved for other data or order."""
        self._step = LoaderState.from_dict(state).check(self.source, self.sampler)

    def __repr__(self) -> str:
        return f"Loader({self.source!r}, {self.sampler!r}, step={self._step})"


def check_cache_order(source: Any, sampler: Sampler) -> None:
    """Warn when the order asked for needs more of the source's remote/compressed shards at once
    than its shard cache holds: a full shuffle over more than ``cache_limit``, or a block
    shuffle whose window of shards does not fit. Nearly every batch would then read shards
    evicted since, so most reads would be downloads."""
    cache = getattr(source, "shard_cache", None)
    if cache is None or cache.limit is None:
        return
    shuffle = getattr(sampler, "shuffle", None)
    if shuffle == "full" and cache.total_bytes > cache.limit:
        warnings.warn(
            f"{source!r}: a full shuffle over {cache.total_bytes:,} bytes of remote/compressed shards with a shard "
            f"cache of {cache.limit:,} bytes (cache_limit): nearly every batch would read shards evicted since, so "
            "most reads would be downloads. Use Sampler(..., shuffle='block', blocks=source.block_starts), which "
            "reads a few shards at a time, or a cache_limit above the data's size", RuntimeWarning, stacklevel=3)
    elif shuffle == "block":
        sizes = np.sort(np.array([s or 0 for s, c in zip(cache.sizes, cache.cached, strict=True) if c],
                                 dtype=np.int64))[::-1]
        k = max(1, int(getattr(sampler, "window", 1)))
        need = int(sizes[: 2 * k].sum())  # the step where one window gives way to the next reads both
        if need > cache.limit:
            fits = max(0, cache.limit // (2 * int(sizes[0]))) if len(sizes) and sizes[0] else 0
            fix = (f"window={fits} or less, or a cache_limit of {need:,} bytes or more" if 1 <= fits < k else
                   f"a cache_limit of {need:,} bytes or more" if k == 1 else
                   f"a cache_limit of {need:,} bytes or more ({int(sizes[:2].sum()):,} for window=1)")
            warnings.warn(
                f"{source!r}: a block shuffle mixes {k} shards at a time (window={k}), and the step where one window "
                f"gives way to the next reads from two: up to {need:,} bytes, more than the shard cache holds "
                f"({cache.limit:,} bytes, cache_limit), so shards would be downloaded again at every such step. Use "
                f"{fix}", RuntimeWarning, stacklevel=3)


class _Lookahead:
    """Hands the record indices of steps ``[step, step + steps)`` to ``hook`` from a thread of its
    own when :meth:`at` is told the step being read (only the latest step counts; again once the
    reader is ``steps // 4`` steps on). A hook that returns False (all its data is local now)
    is not called again."""

    def __init__(self, hook: Callable[[list[np.ndarray]], None], sampler: Sampler, steps: int) -> None:
        self._hook = hook
        self._sampler = copy.copy(sampler)  # its own chunk cache: planning ahead never evicts what readers use
        self._steps = steps
        self._stride = max(1, steps // 4)  # plan again once the reader is this many steps on
        self._memo: dict[int, np.ndarray] = {}
        self._cond = threading.Condition()
        self._want: int | None = None
        self._done: int | None = None  # the latest step told that is taken care of
        self._planned: int | None = None  # where the window planned last starts
        self._error: BaseException | None = None
        self._stop = False
        self._off = False  # the source said there is nothing left to fetch ahead
        self._thread = threading.Thread(target=self._run, name="tandem-lookahead", daemon=True)
        self._thread.start()

    def at(self, step: int) -> None:
        """Step ``step`` is being read: plan from there (raises what the last plan raised)."""
        if self._off:
            return
        step = int(step)
        with self._cond:
            error, self._error = self._error, None
            self._want = step
            if self._planned is not None and self._done == self._planned and 0 <= step - self._planned < self._stride:
                self._done = step  # well inside the window planned last: no need to wake the thread
            else:
                self._cond.notify_all()
        if error is not None:
            raise error

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until the latest step told has been planned (for tests); whether it has."""
        with self._cond:
            return self._cond.wait_for(lambda: self._want == self._done or self._stop, timeout)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._want != self._done)
                if self._stop:
                    return
                step = self._want
                if self._planned is not None and 0 <= step - self._planned < self._stride:
                    self._done = step  # well inside the window planned last
                    self._cond.notify_all()
                    continue
            try:
                self._plan(step)
            except BaseException as e:  # surfaces in the next get_batch
                with self._cond:
                    self._error = e
            with self._cond:
                self._done = self._planned = step
                self._cond.notify_all()

    def _plan(self, step: int) -> None:
        total = self._sampler.total_steps
        end = step + self._steps if total is None else min(step + self._steps, total)
        memo = {s: self._memo[s] if s in self._memo else self._sampler.indices(s) for s in range(step, end)}
        self._memo = memo
        if memo and self._hook(list(memo.values())) is False:
            self._off = True
            self.close()
