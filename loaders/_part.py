"""ProcessPart: which part of the data one process reads (its index among ``count``, and how)."""

from __future__ import annotations

import dataclasses

import numpy as np

MODES = ("global", "contiguous", "interleave")


@dataclasses.dataclass(frozen=True)
class ProcessPart:
    """Which part of the data this process reads.

    ``index`` / ``count``: this process among ``count`` (e.g. ``jax.process_index()``
    and ``jax.process_count()``). ``mode``:

    - ``"global"``: every process takes its slice of the same global batch, so the
      global order does not depend on ``count`` (resume with another process count).
    - ``"contiguous"``: process ``i`` owns the ``i``-th contiguous part of the records
      (``np.array_split`` sizes) and shuffles it per epoch.
    - ``"interleave"``: process ``i`` owns records ``i, i + count, i + 2 * count, ...``.
    """

    index: int = 0
    count: int = 1
    mode: str = "global"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ProcessPart.mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.count, int | np.integer) and self.count >= 1):
            raise ValueError(f"ProcessPart.count must be an integer >= 1, got {self.count!r}")
        if not (0 <= self.index < self.count):
            raise ValueError(f"ProcessPart.index must be in [0, {self.count}), got {self.index!r}")

    def records(self, num_records: int) -> np.ndarray:
        """The sorted record indices this process owns (all records in ``global`` mode).

        O(records) memory: for a caller that really needs the list (a cached source loading
        its part). The sampler uses :meth:`layout` instead.
        """
        first, stride = self.layout(num_records)
        return np.arange(first, first + stride * self.size(num_records), stride, dtype=np.int64)

    def layout(self, num_records: int) -> tuple[int, int]:
        """``(first, stride)``: the ``p``-th record this process owns is ``first + p * stride``.

        ``(0, 1)`` in ``global`` mode (and for one process), ``(start, 1)`` for a
        ``contiguous`` part, ``(index, count)`` for an ``interleave`` part.
        """
        if self.mode == "global" or self.count == 1:
            return 0, 1
        if self.mode == "interleave":
            return self.index, self.count
        return self.bounds(num_records)[0], 1

    def bounds(self, num_records: int) -> tuple[int, int]:
        """``[start, stop)`` of this process's part in ``contiguous`` mode."""
        base, extra = divmod(num_records, self.count)
        start = self.index * base + min(self.index, extra)
        return start, start + base + (1 if self.index < extra else 0)

    def size(self, num_records: int, index: int | None = None) -> int:
        """How many records process ``index`` (default: this one) owns."""
        index = self.index if index is None else index
        if self.mode == "global" or self.count == 1:
            return num_records
        base, extra = divmod(num_records, self.count)
        return base + (1 if index < extra else 0)
