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


# ----------------------------------------------------------------------------- ATEK
# What ATEK's reader (atek.data_loaders.atek_wds_dataloader) does to each webdataset sample, on top of
# TarSource: frames restacked, float64 tensors made float32, gt tensors merged into gt_data, semidense
# points unpacked, then dict_key_mapping, data_transform_fn and the collation, all in the process that
# reads the batch (a worker, with num_workers > 0).
_ATEK_ITEMS = "_atek_items"  # the one key of a step's batch dict: the list of what the step yields
_ATEK_POINTS = ("points_world", "points_inv_dist_std", "points_dist_std")
_ATEK_LENGTHS = "msdpd#points_world_lengths"


def _distributed_part(is_distributed: bool, mode: str = "global") -> ProcessPart:
    if not is_distributed:
        return ProcessPart()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("is_distributed=True but torch.distributed is not initialized (call init_process_group)")
    return ProcessPart(dist.get_rank(), dist.get_world_size(), mode)


def atek_default_collation_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """ATEK's default collation: per key (those of the first sample), tensors of one shape and
    dtype stack along a new first dimension; anything else, and tensors that differ, stay a list.

    One addition for fields ATEK's reader rejects but Tandem passes through (``.cls``): numbers
    stack into a tensor, as Tandem's batches hold them. No samples give ``{}``.
    """
    if not samples:
        return {}
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            alike = all(isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values)
            out[key] = torch.stack(values) if alike else values
        elif isinstance(first, bool | int | float | np.number) and all(type(v) is type(first) for v in values):
            out[key] = torch.from_numpy(np.asarray(values))
        else:
            out[key] = values
    return out


def _atek_frame(stem: str) -> tuple[str, int] | None:
    """``(camera, frame)`` of an ATEK frame member ``<camera>_<frame>.jpeg``, or None."""
    root, _, index = stem.rpartition("_")
    return (root, int(index)) if root and index.isdigit() else None


def _atek_name(field: str) -> str:
    """The key ATEK's reader gives field ``field`` (a frame: its camera; ``.pth``, ``.json``,
    ``.txt``: the name without extension); other fields keep their own name."""
    stem, dot, ext = field.rpartition(".")
    if not dot:
        return field
    if ext == "jpeg":
        frame = _atek_frame(stem)
        return frame[0] if frame else stem
    return stem if ext in ("pth", "json", "txt") else field


def _atek_fields(found: Sequence[str], mapping: Mapping[str, str] | None) -> list[str]:
    """The members to read for ``mapping`` (every one without it): those whose ATEK key it names,
    with what the merged keys are made of (``gt_data#...`` tensors, semidense lengths)."""
    if mapping is None:
        return list(found)
    wanted = set(mapping)
    points = {f"msdpd#{p}" for p in _ATEK_POINTS} & wanted
    keep = []
    for f in found:
        name = _atek_name(f)
        if (name in wanted or (name.startswith("gt_data#") and "gt_data" in wanted)
                or (name == _ATEK_LENGTHS and points) or (name.endswith("+stacked") and name[: -len("+stacked")] in points)):
            keep.append(f)
    return keep


def _as_torch(value: Any) -> Any:
    """A numeric numpy array as a tensor (a field ATEK's reader does not know); anything else as is."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        usable = value.flags.writeable and value.dtype.isnative
        return torch.from_numpy(value if usable else value.astype(value.dtype.newbyteorder("=")))
    return value


def _atek_sample(record: dict[str, Any]) -> dict[str, Any]:
    """One record read by TarSource (images as ``rgb8``) as ATEK's reader gives it."""
    sample = {"__key__": record["__key__"], "__url__": record["__url__"]}
    frames: dict[str, dict[int, Any]] = {}
    for field, value in record.items():
        if field in ("__key__", "__url__"):
            continue
        stem, dot, ext = field.rpartition(".")
        if dot and ext == "jpeg":  # webdataset's "torchrgb8": [3, H, W]
            image = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))
            frame = _atek_frame(stem)
            if frame is None:  # not <camera>_<N>.jpeg: one image, under its name
                sample[stem] = image
            else:  # a frame: stacked with its camera's other frames; single-channel cameras keep channel 0
                frames.setdefault(frame[0], {})[frame[1]] = image if "rgb" in frame[0] else image[0:1]
        elif dot and ext == "pth":
            sample[stem] = value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.float64 else value
        elif dot and ext in ("json", "txt"):
            sample[stem] = value
        else:  # ATEK's reader rejects other fields; Tandem passes them through
            sample[field] = _as_torch(value)
    for camera, by_frame in frames.items():
        sample[camera] = torch.stack([by_frame[k] for k in sorted(by_frame)])
    for name in _ATEK_POINTS:
        stacked = sample.get(f"msdpd#{name}+stacked")
        if stacked is not None:
            lengths = sample[_ATEK_LENGTHS]
            if int(lengths.sum()) != len(stacked):
                from loaders import DataError

                raise DataError(f"{record['__url__']}: sample {record['__key__']!r}: msdpd#{name}+stacked holds "
                                f"{len(stacked)} points, {_ATEK_LENGTHS} adds up to {int(lengths.sum())}")
            sample[f"msdpd#{name}"] = list(torch.split(stacked, lengths.tolist()))
    merged = [k for k, v in sample.items() if k.startswith("gt_data#") and isinstance(v, torch.Tensor)]
    if merged:
        import copy

        gt = copy.deepcopy(sample.get("gt_data", {}))
        for key in merged:
            node = gt
            *path, leaf = key[len("gt_data#"):].split("+")
            for part in path:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[leaf] = sample.pop(key)
        sample["gt_data"] = gt
    return sample


def _is_stream(fn: Callable) -> bool:
    """Whether ``fn`` maps an iterator of samples to an iterator (a generator function, bound or in a
    ``functools.partial``, an object whose ``__call__`` is one, or webdataset's ``pipelinefilter(f)()``)."""
    import functools
    import inspect

    while isinstance(fn, functools.partial):
        fn = fn.func
    if type(fn).__name__ == "FilterFunction" and type(fn).__module__.startswith("webdataset"):
        return True  # pipelinefilter(f)(...): a pipeline stage, given the stream first
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return inspect.isgeneratorfunction(fn)
    return inspect.isgeneratorfunction(vars(type(fn)).get("__call__"))  # a callable object


class _AtekBatches(Loader):
    """A Loader whose batch ``step`` is what ATEK's pipeline yields for the step's records:
    ``{_ATEK_ITEMS: [collated batch]}`` (``[]`` when the transform kept none), or with
    ``single`` the list of samples; the padding of a short last batch is never read."""

    def __init__(self, source: TarSource, sampler: Sampler, mapping: Mapping[str, str] | None,
                 transform: Callable | None, stream: bool, collate: Callable, single: bool) -> None:
        super().__init__(source, sampler)
        self.mapping, self.atek_transform, self.stream = mapping, transform, stream
        self.atek_collate, self.single = collate, single

    def get_batch(self, step: int) -> dict[str, Any]:
        idx, mask = self.sampler.indices_and_mask(step)
        if mask is not None:
            idx = idx[mask]
        samples = [_atek_sample(r) for r in self.source.read_records(idx)]
        if self.mapping is not None:
            samples = [{self.mapping.get(k, k): v for k, v in s.items() if k in ("__key__", "__url__") or k in self.mapping}
                       for s in samples]
        fn = self.atek_transform
        if fn is not None:
            samples = list(fn(iter(samples))) if self.stream else [fn(s) for s in samples]
        items = samples if self.single else [self.atek_collate(samples)] if samples else []
        return {_ATEK_ITEMS: items, self.mask_key: np.ones(1, dtype=bool)}


class _AtekLoader(TorchLoader):
    """A TorchLoader over :class:`_AtekBatches`, yielding each step's items as they are (any structure)."""

    def __init__(self, batches: _AtekBatches, num_workers: int, per_epoch: bool) -> None:
        super().__init__(batches.source, batches.sampler, num_workers=num_workers, per_epoch=per_epoch,
                         batches_per_item=1 if num_workers else None)
        self.loader = self.dataloader.dataset.loader = batches  # the steps' reader: ATEK's batches

    @staticmethod
    def _items(batches: Iterator[dict[str, Any]]) -> Iterator[Any]:
        for batch in batches:
            yield from batch[_ATEK_ITEMS]

    def __iter__(self) -> Iterator[Any]:
        return self._items(super().__iter__())

    def iter_from(self, step: int) -> Iterator[Any]:
        return self._items(super().iter_from(step))


def load_yaml_and_extract_tar_list(yaml_path: str) -> list[str]:
    """ATEK's ``load_yaml_and_extract_tar_list``: the shards of a ``local_*_tars.yaml`` (paths,
    relative ones taken from the YAML's folder) or ``streamable_*_tars.yaml`` (URLs), in order.

    Passing the YAML path itself to :func:`create_native_atek_dataloader` or
    :class:`loaders.TarSource` does the same and also keeps the sha1 and size the streamable
    lists carry, so streamed shards are checked.
    """
    from loaders import expand_shards

    if not str(yaml_path).endswith((".yaml", ".yml")):
        raise ValueError(f"{yaml_path}: expected a .yaml shard list as ATEK's downloader writes it")
    return expand_shards(yaml_path)


def _split_shards(urls: Any, nodesplitter: Callable) -> list[str]:
    """The shards a webdataset-style ``nodesplitter`` leaves this process: it is given
    ``{"url": shard}`` dicts, as webdataset gives it, and may yield dicts or shard strings."""
    from loaders import expand_shards

    paths = expand_shards(urls)
    kept = [item["url"] if isinstance(item, Mapping) else item for item in nodesplitter(iter({"url": p} for p in paths))]
    if not kept:
        name = getattr(nodesplitter, "__name__", type(nodesplitter).__name__)
        raise ValueError(f"nodesplitter {name} left this process none of the {len(paths)} shards ({paths[0]} ...)")
    return [str(p) for p in kept]


def create_native_atek_dataloader(
    urls: str | Sequence[str],
    nodesplitter: ProcessPart | Callable | None = None,
    dict_key_mapping: Mapping[str, str] | None = None,
    data_transform_fn: Callable | None = None,
    collation_fn: Callable[[list[dict]], Any] | None = None,
    batch_size: int | None = None,
    repeat_flag: bool = False,
    shuffle_flag: bool = False,
    num_workers: int = 0,
    *,
    seed: int = 0,
    drop_last: bool = False,
    transform_stream: bool | None = None,
    allow_pickle: bool = False,
    source_options: Mapping[str, Any] | None = None,
) -> TorchLoader:
    """ATEK's ``create_native_atek_dataloader``, reading through Tandem's resumable TarSource.

    Samples are what ATEK's reader gives (webdataset's ``decode("torchrgb8")`` then ATEK's
    per-sample processing): ``<camera>_<N>.jpeg`` frames restacked into a uint8 tensor
    ``[F, C, H, W]`` per camera (C = 1 for cameras without "rgb" in their name), ``.pth``
    tensors (read with ``torch.load(weights_only=True)``; float64 made float32), ``.json`` and
    ``.txt`` values under their names without extension, ``gt_data#a+b+c`` tensors merged
    into ``gt_data["a"]["b"]["c"]``, ``msdpd#...+stacked`` semidense points unpacked into lists,
    and ``__key__`` / ``__url__``. Other fields, which ATEK's reader rejects, pass through under
    their own names (numeric arrays as tensors).

    Args:
      urls: tar paths or URLs, a glob/brace pattern, or ATEK's ``local_*_tars.yaml`` /
        ``streamable_*_tars.yaml`` (URLs are read through the shard cache, see ``source_options``).
      nodesplitter: which part of the data this process reads. A :class:`ProcessPart` splits
        the records (every rank gets as many steps). A callable splits the shards as in
        webdataset (``webdataset.split_by_node``, ``webdataset.single_node_only`` or your
        own): it is given ``{"url": shard}`` dicts and keeps this process's. Default: one
        node, or the ``torch.distributed`` rank and world size when initialized (a record split).
      dict_key_mapping: selects *and* renames ATEK keys (``{"mfcd#camera-rgb+images": "image"}``),
        as ATEK's ``select_and_remap_dict_keys``; ``__key__``/``__url__`` are always kept, keys
        the shards lack are ignored. Only the members the mapping needs are read.
      data_transform_fn: a per-sample function ``fn(sample) -> sample``, or (as ATEK's model
        adaptors are) an iterator adaptor ``fn(samples) -> samples``: generator functions and
        webdataset's ``pipelinefilter(f)()`` are taken as adaptors, any other callable as
        per-sample unless ``transform_stream`` says otherwise. An adaptor runs over each batch's
        samples (a fresh iterator per batch, where the batch is read) and what it yields for them
        is that step's batch. So resume stays exact: the state counts steps, and a restored
        loader gives the same batches. Unlike ATEK, which runs one adaptor over the whole stream
        and refills batches to ``batch_size``, an adaptor that drops samples gives shorter
        batches (a step whose samples it all dropped yields nothing), one that adds samples
        longer ones, and an adaptor's own state starts afresh at every batch. With
        ``batch_size=None`` each step is one sample: its outputs are yielded one by one, and
        the state moves past the step when its first output is taken.
      collation_fn: ``fn(samples) -> batch``, any structure (ATEK's CubeRCNN collation returns a
        list); default :func:`atek_default_collation_fn`.
      batch_size: samples per batch; None yields single samples. The last batch of an epoch
        is short unless ``drop_last``.
      repeat_flag: repeat within one ``for`` loop, forever, each epoch reshuffled with
        ``shuffle_flag``; without it each ``for`` loop is one epoch.
      shuffle_flag: a full shuffle of the records from ``seed`` (ATEK: a 1000-sample buffer).
      num_workers: worker processes reading whole batches.
      seed, drop_last: Tandem's additions.
      transform_stream: whether ``data_transform_fn`` is an iterator adaptor (None: guess).
      allow_pickle: ``.pth`` members beyond what ``weights_only=True`` loads need it (ATEK's
        reader unpickles them all; here that is your explicit choice).
      source_options: more :class:`loaders.TarSource` arguments, e.g. for URLs
        ``{"cache_dir": ..., "cache_limit": 20 * 2**30}`` (the shard cache).

    The loader resumes: ``state_dict()`` / ``load_state_dict()`` as :class:`TorchLoader`.
    Every sample must have every member that is read (ATEK would read it and fail in collation).
    """
    if isinstance(nodesplitter, ProcessPart):
        part, shards = nodesplitter, urls
    elif nodesplitter is not None:
        if not callable(nodesplitter):
            raise TypeError(f"nodesplitter must be a ProcessPart or a callable, got {type(nodesplitter).__name__}")
        part, shards = ProcessPart(), _split_shards(urls, nodesplitter)
    else:
        dist = torch.distributed
        part, shards = _distributed_part(dist.is_available() and dist.is_initialized()), urls
    from loaders import DataError

    options = dict(source_options or {})
    clash = sorted(set(options) & {"keys", "image", "allow_pickle"})
    if clash:
        raise TypeError(f"source_options may not set {clash}: create_native_atek_dataloader chooses them")
    probe = TarSource(shards, keys=["__key__"], **options)  # the fields found (the index is built once, then cached)
    fields = _atek_fields(probe.found_fields, dict_key_mapping)
    if not fields:
        names = sorted({_atek_name(f) for f in probe.found_fields} - {_atek_name(f) for f in probe.found_fields
                                                                         if f.startswith("gt_data#")})
        raise DataError(f"dict_key_mapping names none of the ATEK keys of these shards: mapping {sorted(dict_key_mapping)}, "
                        f"keys {names} (in {probe.shards[0]} ...)")
    source = TarSource(shards, keys=[*fields, "__key__", "__url__"], image="rgb8", allow_pickle=allow_pickle, **options)
    sampler = Sampler(
        len(source),
        (batch_size or 1) * part.count,
        seed=seed,
        shuffle=shuffle_flag,
        drop_remainder=drop_last or batch_size is None,  # single samples never need padding
        part=part,
        num_epochs=None if repeat_flag else 1,
    )
    stream = _is_stream(data_transform_fn) if transform_stream is None and data_transform_fn else bool(transform_stream)
    batches = _AtekBatches(source, sampler, dict(dict_key_mapping) if dict_key_mapping is not None else None,
                           data_transform_fn, stream, collation_fn or atek_default_collation_fn, batch_size is None)
    # repeat_flag: ATEK repeats within one loop (webdataset's .repeat()): one endless stream
    return _AtekLoader(batches, num_workers, per_epoch=not repeat_flag)


def __getattr__(name: str) -> Any:
    if name == "create_dataloader":  # Helios' factory lives with the rest of Helios' data module
        from .helios import create_dataloader

        return create_dataloader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
