"""Loader: the framework-free iterator of numpy batch dicts, resumable by step."""

from __future__ import annotations

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

    Iterating yields batches from the current step to the sampler's end (forever when
    ``num_epochs`` is None). ``state_dict()`` counts batches handed out, not those
    prefetched; ``load_state_dict()`` moves to a saved step.
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
    ) -> None:
        check_compatible(source, sampler)
        self.source = source
        self.sampler = sampler
        self.transform = transform
        self.collate = collate
        self.prefetch = int(prefetch)
        self.threads = max(1, int(threads))
        self.mask_key = mask_key
        self._step = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.sampler.steps_per_epoch

    @property
    def step(self) -> int:
        """The next global step this loader hands out."""
        return self._step

    def get_batch(self, step: int) -> Batch:
        """Batch ``step``: a pure function of ``step`` (safe from any thread or process)."""
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

    def state_dict(self) -> dict[str, Any]:
        """The resume state: a JSON-serializable dict (see :class:`LoaderState`)."""
        return LoaderState.create(self._step, self.source, self.sampler).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; raises if it was saved for other data or order."""
        self._step = LoaderState.from_dict(state).check(self.source, self.sampler)

    def __repr__(self) -> str:
        return f"Loader({self.source!r}, {self.sampler!r}, step={self._step})"
