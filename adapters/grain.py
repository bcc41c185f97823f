"""Grain adapter: a ``grain.MapDataset`` over steps whose elements are whole batches.

Feeding the batches to JAX devices is :mod:`adapters.jax`'s job (it needs no Grain).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from loaders import Loader, LoaderState, Sampler

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

    It behaves as a Grain dataset does:

    - ``iter(loader)`` returns a new :class:`LoaderIterator`, a ``grain.DatasetIterator``
      with its own position, running from the loader's start step (0, or the step of the
      last ``loader.set_state``) to the sampler's end: every epoch, not one. Two
      iterators do not share a cursor, and a new one after an exhausted one starts over.
    - ``it.get_state()`` / ``it.set_state()`` exchange the shared
      :class:`loaders.LoaderState` (JSON), not Grain's per-worker state, so a run may
      resume with another ``worker_count`` or in the PyTorch adapter. ``set_state`` on
      a running iterator continues from the restored step; a step outside the sampler
      raises ``IndexError``. Grain's ``grain.checkpoint.CheckpointHandler`` and
      ``CheckpointSave`` / ``CheckpointRestore`` (orbax) save and restore iterators.
    - ``len(loader)``: the batches one iterator yields from step 0, all epochs
      (``len(loader.dataset)``); an endless sampler (``num_epochs=None``) has no length.

    ``loader.get_state()`` (or ``state_dict()``) is the state of the latest iterator
    (the batches its consumer took), or the start step when there is none; it is the
    convenient form for one loop at a time. ``dataset`` is the ``grain.MapDataset`` of
    all steps (element ``s`` = batch ``s``), for users who add Grain transformations.
    ``iter_from(step)`` streams from any step without touching any state.
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
        self._start = 0  # where new iterators start
        self._position = [0]  # the latest iterator's step, shared with it (no reference to the iterator)
        self._template: LoaderState | None = None

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

        Leaves every state alone: for a caller that keeps its own position (a trainer
        whose device prefetcher reads ahead). ``step`` may be the sampler's end (no
        batches); before 0 or past the end raises ``IndexError``.
        """
        stream, close = self._open(check_start(step, self.loader.sampler))
        return stream if close is None else self._closing(stream, close)

    def _open(self, step: int) -> tuple[Iterator[dict[str, Any]], Callable[[], None] | None]:
        """The batches from ``step`` and what ends them early (None when nothing runs behind them)."""
        if self.worker_count == 0 and self.read_options.num_threads == 0:
            # Nothing to prefetch: read the MapDataset (with any transformation added to it)
            # by index in this process, without an IterDataset's per-element bookkeeping;
            # while ``dataset`` is the one built here, element ``s`` is just batch ``s``.
            ds = self.dataset
            read = self.loader.get_batch if ds is self._steps else ds.__getitem__
            return map(read, range(step, len(ds))), None
        it = iter(self.iter_dataset(step))

        def close() -> None:
            getattr(it, "close", lambda: None)()
            self._reader.release()  # the workers are gone: pin none of their slots

        return it, close

    @staticmethod
    def _closing(stream: Iterator[dict[str, Any]], close: Callable[[], None]) -> Iterator[dict[str, Any]]:
        try:
            yield from stream
        finally:
            close()

    def __iter__(self) -> LoaderIterator:
        """A new Grain iterator from the start step, with its own position (see the class docstring)."""
        self._position = [self._start]
        return LoaderIterator(self, self._start, self._position)

    def __len__(self) -> int:
        """Batches one iterator yields from step 0: every epoch (``len(loader.dataset)``)."""
        total = self.loader.sampler.total_steps
        if total is None:
            raise TypeError("an endless GrainLoader (num_epochs=None) has no length; steps_per_epoch is "
                            f"{self.loader.sampler.steps_per_epoch}")
        return total

    @property
    def step(self) -> int:
        """The next global step of the latest iterator (the start step when there is none)."""
        return self._position[0]

    def _state(self, step: int) -> dict[str, Any]:
        if self._template is None:  # the fingerprint hashes the source's description: once per loader
            self._template = LoaderState.create(0, self.loader.source, self.loader.sampler)
        return dataclasses.replace(self._template, step=step).to_dict()

    def _check(self, state: dict[str, Any]) -> int:
        return LoaderState.from_dict(state).check(self.loader.source, self.loader.sampler)

    def state_dict(self) -> dict[str, Any]:
        """The shared resume state (JSON-serializable) of the latest iterator; the same as ``get_state()``."""
        return self._state(self.step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """New iterators start at a state saved by any Tandem adapter over the same data and
        order; the same as ``set_state()``. Running iterators are left alone."""
        self._start = self._check(state)
        self._position = [self._start]

    get_state = state_dict
    set_state = load_state_dict

    def __repr__(self) -> str:
        return f"GrainLoader({self.loader.source!r}, {self.sampler!r}, worker_count={self.worker_count})"


class LoaderIterator(grain.DatasetIterator):
    """A Grain iterator over a :class:`GrainLoader`'s batches, with its own position.

    ``get_state()`` is the shared :class:`loaders.LoaderState` (a JSON-serializable dict
    of the same shape at every step) at the next batch this iterator yields;
    ``set_state()`` moves there, also while running (the batches already read ahead are
    dropped). ``start_prefetch()`` starts the workers before the first ``next()``;
    ``close()`` stops them.
    """

    def __init__(self, loader: GrainLoader, step: int, position: list[int]) -> None:
        super().__init__()
        self._loader = loader
        self._step = step
        self._position = position  # the loader reads this iterator's step here, if it is the latest
        self._stream: Iterator[dict[str, Any]] | None = None
        self._close_stream: Callable[[], None] | None = None

    def _open(self) -> Iterator[dict[str, Any]]:
        if self._stream is None:
            self._stream, self._close_stream = self._loader._open(self._step)
        return self._stream

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        batch = next(self._open())
        self._step += 1
        self._position[0] = self._step
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._loader._state(self._step)

    def set_state(self, state: dict[str, Any]) -> None:
        step = self._loader._check(state)
        self._stop()
        self._step = self._position[0] = step

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        stream = self._open()
        getattr(stream, "start_prefetch", lambda: None)()

    def _stop(self) -> None:
        close, self._stream, self._close_stream = self._close_stream, None, None
        if close is not None:
            close()

    def close(self) -> None:
        """Stop the workers; ``next()`` then raises ``ValueError`` (also called when collected)."""
        self._stop()
        super().close()

    def _get_next_index(self) -> int:
        return self._step

    def _set_next_index(self, index: int) -> None:
        self._stop()
        self._step = self._position[0] = check_start(index, self._loader.loader.sampler)

    def __repr__(self) -> str:
        return f"LoaderIterator(step={self._step}, {self._loader!r})"
