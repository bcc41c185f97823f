"""Grain adapter: a ``grain.MapDataset`` over steps whose elements are whole batches.

Feeding the batches to JAX devices is :mod:`adapters.jax`'s job (it needs no Grain).
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from loaders import Loader, Sampler

from ._common import StepAdapter, check_start, require
from ._slots import SlotReader, SlotRef, SlotWriter, new_token, unlink_created, use_slots

grain = require("grain", "Grain")

_ENDLESS = 2**62


class _ReadBatch:
    """``step -> batch``: the one map of the dataset (picklable into Grain workers)."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __call__(self, step: int) -> dict[str, Any]:
        return self.loader.get_batch(int(step))


class _ToSlot:
    """Worker side, last map before the hand-off: the batch goes into this worker's slot ring."""

    def __init__(self, slots: int, token: str) -> None:
        self.slots = slots
        self.token = token
        self._writer: SlotWriter | None = None

    def __call__(self, batch: dict[str, Any]) -> SlotRef:
        if self._writer is None:
            self._writer = SlotWriter(self.slots, self.token)
        return self._writer.put(batch)

    def __getstate__(self) -> dict[str, Any]:
        return {"slots": self.slots, "token": self.token, "_writer": None}


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """Grain worker init: end this worker when the training process is gone (even by SIGKILL).

    Grain's spawned workers otherwise outlive a killed parent, holding memory until
    someone kills them by hand.
    """

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                unlink_created()
                os._exit(0)

    threading.Thread(target=watch, name="tandem-parent-watch", daemon=True).start()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; a program that never parsed them gets defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GrainLoader(StepAdapter):
    """Iterate Tandem batches (numpy dicts) through Grain, with Grain's multiprocessing prefetch.

    Args:
      source, sampler: what to read and in which order (see :class:`loaders.Loader`).
      worker_count: Grain worker processes (0: read in this process).
      worker_buffer_size: batches each worker keeps ready.
      read_threads, prefetch: Grain ``ReadOptions``: threads reading ahead, and how many
        batches they buffer. 0 (the default) reads on demand: a whole-batch read is tens
        of microseconds, less than a thread hand-off costs, and ``device_batches``
        already reads a few batches ahead while the devices compute.
      transform, collate: per-record transform ``fn(record, rng)`` and collate.
      shared_slots: workers hand batches over through a ring of shared-memory slots
        they reuse, instead of Grain's new segment per array per batch. ``None`` (the
        default): where that hand-off is sound, x86-64 (see :mod:`adapters._slots`);
        ``True`` elsewhere raises. ``False``: Grain's own hand-off.

    ``dataset`` is the ``grain.MapDataset`` of all steps (element ``s`` = batch ``s``),
    for users who want to add Grain transformations. ``iter_from(step)`` streams from
    any step; iterate this object to get the resumable stream. ``get_state()`` /
    ``set_state()`` exchange the shared :class:`loaders.LoaderState`, not Grain's
    per-worker state, so a run may resume with another ``worker_count`` or in the
    PyTorch adapter.
    """

    def __init__(
        self,
        source: Any,
        sampler: Sampler,
        *,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
        read_threads: int = 0,
        prefetch: int = 0,
        transform: Callable | None = None,
        collate: Callable | None = None,
        shared_slots: bool | None = None,
    ) -> None:
        self.loader = Loader(source, sampler, transform=transform, collate=collate)
        self.shared_slots = use_slots(shared_slots)
        self._reader = SlotReader(new_token())
        weakref.finalize(self, self._reader.close)
        self.worker_count = int(worker_count)
        self.worker_buffer_size = int(worker_buffer_size)
        # Batches a worker can be ahead of the consumer: its process queue (buffer), the one
        # it holds waiting to put, Grain's per-worker thread buffer in this process (buffer)
        # and that thread's element in hand, the consumer's own: 2 * buffer + 3 (measured).
        # Two more for margin; an overrun is detected anyway, never a wrong batch.
        self.slots = 2 * self.worker_buffer_size + 5
        self.read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        total = sampler.total_steps
        self.dataset: grain.MapDataset = grain.MapDataset.range(total if total is not None else _ENDLESS).map(
            _ReadBatch(self.loader)
        )
        self._steps = self.dataset

    def iter_dataset(self, start: int) -> grain.IterDataset:
        """The Grain pipeline from global step ``start`` (what ``iter_from`` runs)."""
        ds = self.dataset[start:]
        if self.worker_count == 0:
            return ds.to_iter_dataset(self.read_options)
        _absl_flags_parsed()
        if self.shared_slots:  # after any transformation the user added to ``dataset``
            ds = ds.map(_ToSlot(self.slots, self._reader.token))
        options = grain.MultiprocessingOptions(num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size)
        ds = ds.to_iter_dataset(self.read_options).mp_prefetch(
            options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid())
        )
        return ds.map(self._receive) if self.shared_slots else ds

    def _receive(self, item: Any) -> Any:
        return self._reader.take(item) if isinstance(item, SlotRef) else item

    def iter_from(self, step: int) -> Iterator[dict[str, Any]]:
        """Batches of global steps ``step``, ``step + 1``, ... to the sampler's end (endless
        when ``num_epochs`` is None), through the pipeline of :meth:`iter_dataset`.

        Leaves :attr:`step` and the state alone: for a caller that keeps its own position
        (a trainer whose device prefetcher reads ahead). ``step`` may be the sampler's end
        (no batches); before 0 or past the end raises ``IndexError``.
        """
        step = check_start(step, self.loader.sampler)
        if self.worker_count == 0 and self.read_options.num_threads == 0:
            # Nothing to prefetch: read the MapDataset (with any transformation added to it)
            # by index in this process, without an IterDataset's per-element bookkeeping;
            # while ``dataset`` is the one built here, element ``s`` is just batch ``s``.
            ds = self.dataset
            read = self.loader.get_batch if ds is self._steps else ds.__getitem__
            return map(read, range(step, len(ds)))
        return self._pipeline(step)

    def _pipeline(self, step: int) -> Iterator[dict[str, Any]]:
        it = iter(self.iter_dataset(step))
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            self._reader.release()  # the workers are gone: pin none of their slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The stream from :attr:`step` to the sampler's end, counting the batches taken."""
        return self._counted(self.iter_from(self._step))

    def get_state(self) -> dict[str, Any]:
        """The shared resume state (JSON-serializable); the same as ``state_dict()``."""
        return self.state_dict()

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a state saved by any Tandem adapter over the same data and order;
        the same as ``load_state_dict()``."""
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return f"GrainLoader({self.loader.source!r}, {self.sampler!r}, worker_count={self.worker_count})"
