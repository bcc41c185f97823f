"""PyTorch adapter: a ``DataLoader`` whose items are whole batches, indexed by step.

The sampler alone decides the order; worker processes only call ``read_batch`` for
the step they are given. ``iter_from(step)`` streams from any step; iterating the
adapter streams from the step its consumer has reached, which the state counts.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from loaders import Loader, LoaderState, ProcessPart, Sampler, TarSource

from ._common import StepAdapter, check_start, require
from ._slots import SlotReader, SlotRef, SlotWriter, new_token, use_slots

torch = require("torch", "PyTorch")


def to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    """Numeric numpy arrays become tensors (sharing memory when writable); others pass through."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "biufc":
            usable = v.flags.writeable and v.dtype.isnative
            out[k] = torch.from_numpy(v if usable else np.array(v, dtype=v.dtype.newbyteorder("=")))
        else:
            out[k] = v
    return out


ITEM_BYTES = 1 << 20  # with workers, a DataLoader item groups batches up to about this size ...
MAX_GROUP = 8  # ... and at most this many


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset: item ``step`` is the batch of that step; item ``(step, count)``
    the list of ``count`` consecutive batches from ``step``.

    In a worker process (with ``slots``), the batches go into the worker's ring of
    shared-memory slots and only a :class:`SlotRef` travels to the main process.
    """

    def __init__(self, loader: Loader, slots: int, token: str, pad_last: bool = True) -> None:
        self.loader = loader
        self.slots = slots
        self.token = token
        self.pad_last = pad_last
        self._writer: SlotWriter | None = None

    def read(self, step: int) -> dict[str, Any]:
        """Batch ``step`` as numpy; without ``pad_last``, the padding rows of a short batch removed."""
        batch = self.loader.get_batch(step)
        if self.pad_last or self.loader.sampler.drop_remainder:
            return batch
        return drop_padding(batch, self.loader.mask_key)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            start, count = item
            batches = [self.read(s) for s in range(start, start + count)]
            if self._in_worker():
                return self._slot_writer().put_many(batches)
            return [to_torch(b) for b in batches]
        batch = self.read(int(item))
        return self._slot_writer().put(batch) if self._in_worker() else to_torch(batch)

    def _in_worker(self) -> bool:
        return bool(self.slots) and torch.utils.data.get_worker_info() is not None

    def _slot_writer(self) -> SlotWriter:
        if self._writer is None:
            self._writer = SlotWriter(self.slots, self.token)
        return self._writer

    def __len__(self) -> int:
        total = self.loader.sampler.total_steps
        return total if total is not None else 2**62


class _Steps(torch.utils.data.Sampler):
    """Yields the global steps ``[start, stop)`` (``stop`` None: endless), as set by the
    adapter just before each ``iter()`` of the DataLoader, which reads them at once.

    With ``group`` set, yields ``(first step, count)`` items of up to ``group`` steps;
    ``group`` is read at every item, so it may change while an iteration runs.
    """

    def __init__(self, group: int | None) -> None:
        self.start: int = 0
        self.stop: int | None = None
        self.group = group

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        start, stop = self.start, self.stop
        if self.group is None:
            return iter(range(start, stop)) if stop is not None else itertools.count(start)
        return self._groups(start, stop)

    def _groups(self, step: int, stop: int | None) -> Iterator[tuple[int, int]]:
        while stop is None or step < stop:
            count = self.group if stop is None else min(self.group, stop - step)
            yield step, count
            step += count

    def __len__(self) -> int:
        """Steps in the range (items, when not grouped)."""
        if self.stop is None:
            raise TypeError("an endless loader (num_epochs=None) has no length")
        return max(0, self.stop - self.start)


def drop_padding(batch: dict[str, Any], mask_key: str = "_valid") -> dict[str, Any]:
    """``batch`` without its padding rows (where ``mask_key`` is False) and without the mask:
    a short batch, as PyTorch's ``drop_last=False`` gives (0 rows if all are padding)."""
    batch = dict(batch)
    mask = np.asarray(batch.pop(mask_key))
    if mask.all():
        return batch
    keep = np.flatnonzero(mask)
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.ndim > 0 and len(v) == len(mask):
            out[k] = v[keep]
        elif isinstance(v, list | tuple) and len(v) == len(mask):
            out[k] = type(v)(v[i] for i in keep)
        else:
            out[k] = v
    return out


def _already_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """Items are whole batches, already tensors: nothing for the DataLoader to convert."""
    return batch


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


class TorchLoader(StepAdapter):
    """Iterate Tandem batches as ``dict[str, torch.Tensor]`` through a ``DataLoader``.

    Args:
      source, sampler: what to read and in which order (see :class:`loaders.Loader`).
      num_workers, pin_memory, persistent_workers, prefetch_factor, timeout:
        as in ``torch.utils.data.DataLoader``; each worker reads whole batches.
      multiprocessing_context: ``"fork"``, ``"spawn"``, ``"forkserver"`` or None.
      transform, collate: per-record transform ``fn(record, rng)`` and collate, as in
        :class:`loaders.Loader`.
      shared_slots: workers hand batches over through a ring of shared-memory slots
        they reuse (``prefetch_factor + 2`` each) instead of a new segment per batch.
        ``None`` (the default): where that hand-off is sound, x86-64 (see
        :mod:`adapters._slots`); ``True`` elsewhere raises. ``False``: PyTorch's own hand-off.
      batches_per_item: with workers, how many consecutive batches a worker reads per
        ``DataLoader`` item. Each item costs a round trip between processes (~150 us
        here), as much as reading a small batch; grouping spreads it. ``None`` (the
        default): 1 for the first items, then as many as fit in about 1 MiB (at most
        8), from the size of the first batch received. ``prefetch_factor`` counts items.
      per_epoch: ``True`` (PyTorch's habit): each ``iter(loader)`` runs one epoch, as
        torchdata's ``StatefulDataLoader`` does, so ``for epoch in ...: for batch in
        loader`` works: the first from step 0 (or from a loaded state, to the end of its
        epoch), each later one through the epoch after the previous iterator's, even if
        that one was left early. ``False``: one stream to the sampler's end (endless if
        ``num_epochs`` is None); a new ``iter()`` continues where the last one stopped.
      pad_last: with a sampler that keeps the remainder (``drop_remainder=False``):
        ``False`` (the default, PyTorch's ``drop_last=False``): the last batch of an
        epoch is short (its padding rows removed; 0 rows for a process whose slice is all
        padding, so ranks stay in step) and has no mask key. ``True``: every batch has
        the full size and a boolean ``_valid`` key, False for padding (what JAX needs:
        static shapes; the Grain adapter and the trainer always pad).

    ``state_dict()`` / ``load_state_dict()`` follow torchdata's ``Stateful``
    convention and exchange the shared :class:`loaders.LoaderState`: a state saved
    here restores into the Grain adapter, or here with another ``num_workers``.
    ``state_dict()`` is the position of the latest iterator (the batches its consumer
    took); each iterator keeps its own position. ``load_state_dict()`` stops running
    iterators; the next ``iter()`` starts at the loaded step.
    Worker RNGs are seeded from the ``DataLoader`` generator, itself seeded from the
    sampler's seed, so user code that draws from ``numpy.random`` in a worker is
    repeatable too. With ``persistent_workers``, one stream runs at a time (PyTorch
    restarts its one worker iterator for each new one).
    """

    def __init__(
        self,
        source: Any,
        sampler: Sampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
        transform: Callable | None = None,
        collate: Callable | None = None,
        per_epoch: bool = True,
        shared_slots: bool | None = None,
        batches_per_item: int | None = None,
        pad_last: bool = False,
    ) -> None:
        if batches_per_item is not None and batches_per_item < 1:
            raise ValueError(f"batches_per_item must be at least 1, got {batches_per_item}")
        self.loader = Loader(source, sampler, transform=transform, collate=collate)
        self.per_epoch = per_epoch
        self.pad_last = bool(pad_last)
        self._position = [0]  # the latest iterator's next step (each iterator has its own cell)
        self._resume: int | None = 0  # where the next iter() starts, when set by a load (or at construction)
        self._started: int | None = None  # where the latest iterator started
        # Grouped items only where there is a hand-off to spread: with worker processes.
        self._auto_group = batches_per_item is None and num_workers > 0
        group = (1 if self._auto_group else batches_per_item) if num_workers > 0 else None
        slots = (prefetch_factor or 2) + 2 if use_slots(shared_slots) and num_workers > 0 else 0
        self._reader = SlotReader(new_token())
        weakref.finalize(self, self._reader.close)
        self._pin = pin_memory and torch.cuda.is_available()
        generator = torch.Generator()
        # Seeds the workers' numpy.random / random streams: per rank, so ranks do not draw alike.
        # (Order and resume never depend on them; per-record randomness belongs to record_rng.)
        generator.manual_seed(int(np.random.SeedSequence([sampler.seed, sampler.part.index]).generate_state(1, np.uint64)[0]))
        self.dataloader = torch.utils.data.DataLoader(
            _Batches(self.loader, slots, self._reader.token, self.pad_last),
            batch_size=None,
            sampler=_Steps(group),
            num_workers=num_workers,
            collate_fn=_already_collated,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            timeout=timeout,
            worker_init_fn=_seed_worker if num_workers > 0 else None,
            generator=generator,
        )

    def iter_from(self, step: int) -> Iterator[dict[str, Any]]:
        """Batches of global steps ``step``, ``step + 1``, ... to the sampler's end (endless
        when ``num_epochs`` is None), read by the workers as ``iter()`` would.

        Ignores ``per_epoch`` and leaves :attr:`step` and the state alone: for a caller
        that keeps its own position (a trainer whose device prefetcher reads ahead).
        ``step`` may be the sampler's end (no batches); before 0 or past the end raises
        ``IndexError``.
        """
        return self._batches(check_start(step, self.loader.sampler), self.loader.sampler.total_steps)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A new iterator: one epoch with ``per_epoch`` (see the class docstring), else the
        stream from :attr:`step`; it counts the batches its consumer takes."""
        sampler = self.loader.sampler
        per, total = sampler.steps_per_epoch, sampler.total_steps
        if self._resume is not None:
            start = self._resume
        elif not self.per_epoch:
            start = self._position[0]
        else:  # StatefulDataLoader: every new iterator is the next epoch
            start = (self._started // per + 1) * per
        if total is not None:
            start = min(start, total)
        self._resume, self._started = None, start
        stop = total
        if self.per_epoch:
            epoch_end = (start // per + 1) * per
            stop = epoch_end if stop is None else min(epoch_end, stop)
        self._position = cell = [start]
        return self._counting(self._batches(start, stop), cell, self._restores)

    def _counting(self, batches: Iterator[dict[str, Any]], cell: list[int], restores: int) -> Iterator[dict[str, Any]]:
        for batch in batches:
            if self._restores != restores:
                return  # a state was loaded: the next iter() starts there
            cell[0] += 1
            yield batch

    @property
    def step(self) -> int:
        """The next global step of the latest iterator (or where the next one starts after a load)."""
        return self._position[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state saved by any Tandem adapter over the same data and order.

        Running iterators stop; the next ``iter()`` starts at the saved step (with
        ``per_epoch``, to the end of that step's epoch).
        """
        step = LoaderState.from_dict(state).check(self.loader.source, self.loader.sampler)
        self._resume, self._position = step, [step]
        self._restores += 1

    def _batches(self, start: int, stop: int | None) -> Iterator[dict[str, Any]]:
        """Batches ``start`` .. ``stop - 1`` (``stop`` None: endless), as tensors."""
        if self.dataloader.num_workers == 0:
            # In-process, a DataLoader would only call dataset[step] for each step, adding
            # ~15 us of bookkeeping per batch (measured): do just that.
            steps = range(start, stop) if stop is not None else itertools.count(start)
            dataset = self.dataloader.dataset
            trims = not (dataset.pad_last or self.loader.sampler.drop_remainder)
            batches = map(to_torch, map(dataset.read if trims else self.loader.get_batch, steps))
            return map(self._pinned, batches) if self._pin else batches
        sampler = self.dataloader.sampler
        sampler.start, sampler.stop = start, stop
        items = iter(self.dataloader)  # reads the range now, before another stream may set its own
        return self._stream(items)

    def _stream(self, items: Iterator[Any]) -> Iterator[dict[str, Any]]:
        try:
            for item in items:
                yield from self._receive(item)
        finally:
            self._reader.release()  # this stream's workers are ending: pin none of their slots

    def _receive(self, item: Any) -> list[dict[str, Any]]:
        """The batches of one DataLoader item, as tensors."""
        if isinstance(item, SlotRef):
            item = self._reader.take(item)
            batches = [to_torch(b) for b in item] if isinstance(item, list) else [to_torch(item)]
            if self._pin:
                batches = [self._pinned(b) for b in batches]
        else:  # PyTorch's own hand-off (which pins, if asked), without shared slots
            batches = item if isinstance(item, list) else [item]
        if self._auto_group:
            self._auto_group = False
            size = sum(v.nbytes for v in batches[0].values() if isinstance(v, torch.Tensor))
            self.dataloader.sampler.group = max(1, min(MAX_GROUP, ITEM_BYTES // max(1, size)))
        return batches

    @staticmethod
    def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def __repr__(self) -> str:
        return f"TorchLoader({self.loader.source!r}, {self.sampler!r}, num_workers={self.dataloader.num_workers})"


def _distributed_part(is_distributed: bool, mode: str = "global") -> ProcessPart:
    if not is_distributed:
        return ProcessPart()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("is_distributed=True but torch.distributed is not initialized (call init_process_group)")
    return ProcessPart(dist.get_rank(), dist.get_world_size(), mode)


def create_native_atek_dataloader(
    urls: str | Sequence[str],
    nodesplitter: ProcessPart | None = None,
    dict_key_mapping: Mapping[str, str] | None = None,
    data_transform_fn: Callable[[dict], dict] | None = None,
    collation_fn: Callable[[list[dict]], Any] | None = None,
    batch_size: int | None = None,
    repeat_flag: bool = False,
    shuffle_flag: bool = False,
    num_workers: int = 0,
    *,
    seed: int = 0,
    drop_last: bool = False,
) -> TorchLoader:
    """ATEK's ``create_native_atek_dataloader``, reading through Tandem's resumable TarSource.

    ``urls``: local tar paths, a glob/brace pattern, or ATEK's ``local_*_tars.yaml``.
    ``nodesplitter``: the :class:`ProcessPart` of this node (default: one node, or the
    ``torch.distributed`` rank and world size when initialized). ``dict_key_mapping``
    selects *and* renames fields, as in ATEK. ``batch_size=None`` yields single samples.
    ``repeat_flag`` repeats within one ``for`` loop, forever, each epoch reshuffled with
    ``shuffle_flag`` (from ``seed``); without it each ``for`` loop is one epoch.
    """
    if nodesplitter is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        nodesplitter = _distributed_part(initialized)
    keys = list(dict_key_mapping) if dict_key_mapping else None
    source = TarSource(urls, keys=keys, rename=dict_key_mapping, transform=data_transform_fn)
    per_rank = batch_size or 1
    sampler = Sampler(
        len(source),
        per_rank * nodesplitter.count,
        seed=seed,
        shuffle=shuffle_flag,
        drop_remainder=drop_last or batch_size is None,  # single samples never need padding
        part=nodesplitter,
        num_epochs=None if repeat_flag else 1,
    )
    collate = collation_fn
    if batch_size is None:
        def collate(records):  # noqa: E306 - ATEK's batch_size=None: one sample at a time
            return records[0]
    # repeat_flag: ATEK repeats within one loop (webdataset's .repeat()): one endless stream
    return TorchLoader(source, sampler, num_workers=num_workers, collate=collate, per_epoch=not repeat_flag)


def __getattr__(name: str) -> Any:
    if name == "create_dataloader":  # Helios' factory lives with the rest of Helios' data module
        from .helios import create_dataloader

        return create_dataloader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
