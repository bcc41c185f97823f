"""The sampler: a pure function from a global step to this rank's record indices.

Nothing here has hidden state. ``Sampler.indices(step)`` depends only on the
constructor arguments and ``step``, so resuming a run is one integer, and any
number of worker processes can compute any batch without talking to each other.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence

import numpy as np

from ._part import ProcessPart

SHUFFLES = ("none", "full", "block")

# Streams of the seed sequence, so that unrelated random draws never share numbers.
_STREAM_ORDER = 0
_STREAM_BLOCKS = 1
_STREAM_RECORD = 2


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def record_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """The random generator for one record in one epoch (for augmentations).

    Derived from ``(seed, epoch, record)`` only, so worker processes, restarts and
    other frameworks all draw the same numbers for the same record.
    """
    return _rng(seed, _STREAM_RECORD, epoch, record)


class Sampler:
    """Maps a global step to the record indices of this process's part of that batch.

    Args:
      num_records: records in the source (``len(source)``).
      batch_size: the *global* batch size, summed over all processes. It must divide
        by ``part.count``; each process reads ``batch_size // part.count`` records.
      seed: seeds the shuffle. Same seed, same order, on every machine.
      shuffle: ``"full"`` (or ``True``): a fresh permutation every epoch.
        ``"block"``: permute blocks (HDF5 chunks, tar shards) and shuffle records
        within windows of ``window`` consecutive blocks, for data too large to read
        at random. ``"none"`` (or ``False``): file order.
      drop_remainder: ``True``: every batch is full; records that do not fill a last
        batch are left out of that epoch (a different few each epoch when shuffled).
        ``False``: the last batch is padded by wrapping around the epoch's order, and
        the mask of ``indices_and_mask(step)`` marks the padding ``False``.
      part: which part of the data this process reads (:class:`ProcessPart`).
      num_epochs: ``None`` for an endless stream, else the number of epochs.
      blocks: for ``shuffle="block"``: a block size in records, or the sorted start
        offsets of the blocks (e.g. ``source.block_starts``).
      window: blocks shuffled together in ``"block"`` mode.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool | str = True,
        drop_remainder: bool = True,
        part: ProcessPart | None = None,
        num_epochs: int | None = None,
        blocks: int | Sequence[int] | np.ndarray | None = None,
        window: int = 8,
    ) -> None:
        part = part or ProcessPart()
        shuffle = {True: "full", False: "none"}.get(shuffle, shuffle)  # type: ignore[arg-type]
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES} (or a bool), got {shuffle!r}")
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % part.count:
            raise ValueError(
                f"global batch_size {batch_size} does not divide among {part.count} processes: "
                f"use a multiple of {part.count} (e.g. {part.count * max(1, batch_size // part.count)})"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_records = int(num_records)
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // part.count
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_remainder = bool(drop_remainder)
        self.part = part
        self.num_epochs = num_epochs
        self.window = int(window)
        self._block_starts = self._parse_blocks(blocks) if shuffle == "block" else None
        self._owned = part.records(self.num_records) if part.mode != "global" else None
        self._local_blocks = (
            None
            if self._block_starts is None
            else (
                self._block_starts
                if self._owned is None
                else np.unique(np.searchsorted(self._owned, self._block_starts))
            )
        )
        self.steps_per_epoch = self._steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no full batch: {self.num_records} records, global batch size {self.batch_size}, "
                f"{part.count} process(es) in {part.mode!r} mode with drop_remainder=True"
            )
        self._cache: dict[int, np.ndarray] = {}  # the last two epochs' orders
        self._cache_lock = threading.Lock()

    # ----------------------------------------------------------------- setup
    def _parse_blocks(self, blocks) -> np.ndarray:
        if blocks is None:
            raise ValueError('shuffle="block" needs blocks= (a block size, or source.block_starts)')
        if np.isscalar(blocks):
            size = int(blocks)  # type: ignore[arg-type]
            if size < 1:
                raise ValueError(f"block size must be >= 1, got {size}")
            return np.arange(0, self.num_records, size, dtype=np.int64)
        starts = np.asarray(blocks, dtype=np.int64)
        if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0):
            raise ValueError("blocks must be a block size or increasing block starts beginning at 0")
        if starts[-1] >= self.num_records:
            raise ValueError(f"block start {starts[-1]} is past the last record ({self.num_records - 1})")
        return starts

    def _positions(self) -> int:
        """Records in one epoch's order for this process (before dropping or padding)."""
        return self.num_records if self._owned is None else len(self._owned)

    def _steps_per_epoch(self) -> int:
        if self.part.mode == "global" or self.part.count == 1:
            n, b = self.num_records, self.batch_size
        else:
            sizes = [self.part.size(self.num_records, i) for i in range(self.part.count)]
            n, b = (min(sizes) if self.drop_remainder else max(sizes)), self.local_batch_size
        return n // b if self.drop_remainder else math.ceil(n / b)

    # ----------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """This process's record indices for one epoch, in visiting order (no padding)."""
        order = self._cache.get(epoch)
        if order is None:
            order = self._make_order(epoch)
            with self._cache_lock:  # prefetch threads may cross an epoch boundary together
                self._cache[epoch] = order
                while len(self._cache) > 2:
                    self._cache.pop(next(iter(self._cache)))
        return order

    def _make_order(self, epoch: int) -> np.ndarray:
        m = self._positions()
        rank_word = 0 if self._owned is None else self.part.index + 1
        if self.shuffle == "none":
            pos = np.arange(m, dtype=np.int64)
        elif self.shuffle == "full":
            pos = _rng(self.seed, _STREAM_ORDER, epoch, rank_word).permutation(m)
        else:
            pos = self._block_order(m, epoch, rank_word)
        return pos if self._owned is None else self._owned[pos]

    def _block_order(self, m: int, epoch: int, rank_word: int) -> np.ndarray:
        starts = self._local_blocks
        assert starts is not None
        bounds = np.append(starts[starts < m], m)
        nblocks = len(bounds) - 1
        rng = _rng(self.seed, _STREAM_BLOCKS, epoch, rank_word)
        perm = rng.permutation(nblocks)
        pieces = []
        for w in range(0, nblocks, self.window):
            chosen = perm[w : w + self.window]
            idx = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in chosen])
            rng.shuffle(idx)
            pieces.append(idx)
        return np.concatenate(pieces).astype(np.int64, copy=False)

    # ----------------------------------------------------------------- lookup
    def epoch(self, step: int) -> int:
        """The epoch that global step ``step`` belongs to."""
        return step // self.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        """Steps over all epochs, or ``None`` for an endless stream."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def _lookup(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        if step < 0 or (self.total_steps is not None and step >= self.total_steps):
            raise IndexError(f"step {step} is outside [0, {self.total_steps}) ({self.num_epochs} epoch(s))")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        if self._owned is None:
            b = self.batch_size
            start = within * b + self.part.index * self.local_batch_size
        else:
            start = within * self.local_batch_size
        pos = np.arange(start, start + self.local_batch_size)
        m = len(order)
        if pos[-1] < m:
            return order[start : start + self.local_batch_size], None
        return order[pos % m], pos < m

    def indices(self, step: int) -> np.ndarray:
        """Record indices of this process's part of global batch ``step``."""
        return self._lookup(step)[0]

    def indices_and_mask(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(indices(step), mask)``: the mask is ``None`` when every record is real, else ``True``
        for real records and ``False`` for the padding of a last, short batch."""
        return self._lookup(step)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_cache={}, _cache_lock=None)  # workers compute their own orders
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    # ----------------------------------------------------------------- identity
    def describe(self) -> str:
        """What decides the order, for the resume fingerprint.

        Leaves out the process index, and in ``global`` mode the process count: a
        state may move to another process (or another number of them in ``global``).
        """
        blocks = ""
        if self._block_starts is not None:
            digest = hashlib.sha256(self._block_starts.tobytes()).hexdigest()[:12]
            blocks = f", blocks={len(self._block_starts)}:{digest}, window={self.window}"
        part = f"mode={self.part.mode!r}"
        if self.part.mode != "global":
            part += f", count={self.part.count}"
        return (
            f"Sampler(num_records={self.num_records}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle!r}{blocks}, drop_remainder={self.drop_remainder}, {part})"
        )

    def __repr__(self) -> str:
        return self.describe()[:-1] + f", index={self.part.index}, num_epochs={self.num_epochs})"
