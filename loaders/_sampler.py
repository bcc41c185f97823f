"""The sampler: a pure function from a global step to this rank's record indices.

Nothing here has hidden state. ``Sampler.indices(step)`` depends only on the
constructor arguments and ``step``, so resuming a run is one integer, and any
number of worker processes can compute any batch without talking to each other.

No order is ever materialized. An epoch's order is a keyed bijection on the
positions ``[0, n)``, evaluated (vectorized) only at the positions a batch needs, so
the cost of a batch and the memory do not grow with the number of records:

- ``_permute``: a Feistel network over ``[0, A * B)`` (``A = ceil(sqrt(n))``,
  ``B = ceil(n / A)``, so the domain exceeds ``n`` by less than ``A``) whose halves
  are mixed by modular addition of a keyed 64-bit hash, 6 rounds (more for domains
  under 1024, whose round functions take few values: :func:`_rounds`), with cycle
  walking (apply again while the value is ``>= n``; rare, as the domain is at most
  ``n + sqrt(n)``). The keys come from ``numpy.random.SeedSequence`` over
  ``(seed, stream, epoch, rank word)`` and all arithmetic is explicit ``uint64``, so
  every platform computes the same order.
- ``"block"``: the blocks are permuted by the same bijection over the block count;
  window ``j`` holds the permuted blocks ``j * window ... (j + 1) * window - 1``, and
  its records are shuffled by a bijection keyed by ``(seed, epoch, rank word, j)``
  over the window's record count (so a window needs nothing but itself). Finding the
  window of a position takes the windows' cumulative sizes: closed-form for a fixed
  block size, else a per-epoch table of ``#blocks / window`` entries.
- ``contiguous`` / ``interleave`` parts: the ``p``-th record a process owns is
  ``first + p * stride`` (:meth:`ProcessPart.layout`); nothing lists the part.

``indices(step)`` evaluates the steps of a chunk (about :data:`_CHUNK` positions) at
once and keeps the last two chunks, so consecutive steps cost a slice; the order is
the same whichever way it is computed.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence

import numpy as np

from ._part import ProcessPart

SHUFFLES = ("none", "full", "block")

#: Version of the order the arguments give: in ``describe()`` and so in every resume
#: fingerprint. Bump it whenever the same arguments would give another order, so that a
#: state saved under the old order is refused rather than resumed on a different one.
#: 1: materialized ``PCG64`` permutations. 2: the Feistel bijection.
ORDER_VERSION = 2

# Streams of the seed sequence, so that unrelated random draws never share numbers.
_STREAM_ORDER = 0
_STREAM_BLOCKS = 1
_STREAM_RECORD = 2

_MAX_ROUNDS = 16  # Feistel rounds for the smallest domains (see _rounds)
_CHUNK = 4096  # positions evaluated together by indices() and cached (the last two chunks)
_BULK = 65536  # positions per vectorized pass when evaluating many (keeps temporaries in cache)
_FEW = 8  # cycle walking: this many values or fewer are walked with Python ints
_RUNS = 16  # block mode: up to this many windows in one evaluation are shuffled one by one
_LAYOUTS = 64  # block mode: windows whose layout an epoch's plan keeps
_AHEAD = 16  # block mode: windows laid out together (those asked for and the next ones)
_TABLE = 1 << 16  # block mode: a window of at most this many records read again is evaluated whole (512 KiB)
_MAX_TABLE = 2**24  # irregular blocks cut from a block size: at most this many listed
_MAX_RECORDS = 2**62  # so that every intermediate value fits in uint64

_U = np.uint64
_M1, _M2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)  # splitmix64's multipliers
_GOLDEN = _U(0x9E3779B97F4A7C15)
_S27, _S30, _S31, _S32 = _U(27), _U(30), _U(31), _U(32)


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def record_rng(seed: int, epoch: int, record: int) -> np.random.Generator:
    """The random generator for one record in one epoch (for augmentations).

    Derived from ``(seed, epoch, record)`` only, so worker processes, restarts and
    other frameworks all draw the same numbers for the same record.
    """
    return _rng(seed, _STREAM_RECORD, epoch, record)


# --------------------------------------------------------------------------- the bijection
def _keys(*words: int, count: int) -> np.ndarray:
    """``count`` uint64 round keys from the words (SeedSequence: the same on every platform)."""
    return np.random.SeedSequence([int(w) for w in words]).generate_state(count, np.uint64)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (a bijection of 64-bit words)."""
    z = z ^ (z >> _S30)
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _rounds(domain):
    """Feistel rounds for a network on ``domain`` values (an int or a uint64 array).

    6 suffice from 1024 on (Grain's ``index_shuffle`` uses 4); smaller domains need more,
    as each round function then takes only a few values: with 6 rounds, where two records
    land relative to each other is measurably non-uniform at 100 records, and with 8 at 16
    (chi-square over 200,000 seeds); 10 and 16 rounds pass those tests.
    """
    if np.ndim(domain) == 0:
        return 6 if domain >= 1024 else 10 if domain >= 64 else 16
    return np.where(domain >= 1024, 6, np.where(domain >= 64, 10, 16))


def _split(n: int) -> tuple[int, int]:
    """The Feistel halves' sizes ``(A, B)`` for ``[0, n)``: ``A * B >= n``, ``A * B - n < A``."""
    a = math.isqrt(n - 1) + 1
    return a, -(-n // a)


def _split_array(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_split` for a uint64 array of sizes (each >= 1)."""
    r = np.floor(np.sqrt((n - _U(1)).astype(np.float64))).astype(np.uint64)
    r -= (r * r > n - _U(1)).astype(np.uint64)  # float rounding, either way
    r += ((r + _U(1)) * (r + _U(1)) <= n - _U(1)).astype(np.uint64)
    a = r + _U(1)
    return a, (n + a - _U(1)) // a


def _feistel(x: np.ndarray, a, b, keys: np.ndarray, inverse: bool = False) -> np.ndarray:
    """One pass of the network on ``[0, a * b)``: ``x = left * b + right``; round ``i`` adds a
    keyed hash of one half to the other, modulo its size (``a`` for left, ``b`` for right).

    ``a``, ``b``: uint64 scalars or arrays like ``x``; ``keys``: ``(rounds,)`` or ``(rounds, len(x))``.
    """
    left, right = np.divmod(x, b)
    t = np.empty_like(x)
    u = np.empty_like(x)
    rounds = range(len(keys) - 1, -1, -1) if inverse else range(len(keys))
    for i in rounds:
        src, dst, mod = (right, left, a) if i % 2 == 0 else (left, right, b)
        np.bitwise_xor(src, keys[i], out=t)
        np.multiply(t, _M1, out=t)
        np.right_shift(t, _S31, out=u)
        np.bitwise_xor(t, u, out=t)
        np.multiply(t, _M2, out=t)
        np.right_shift(t, _S32, out=t)  # the hash's high 32 bits
        np.multiply(t, mod, out=t)
        np.right_shift(t, _S32, out=t)  # scaled into [0, mod) (mod <= 2**32)
        # dst = (dst +- f) mod `mod`, without branches: of v and v - mod (or v + mod), the smaller
        # is right, because uint64 wraps the wrong one to a huge value
        if inverse:
            np.subtract(dst, t, out=dst)
            np.add(dst, mod, out=t)
        else:
            np.add(dst, t, out=dst)
            np.subtract(dst, mod, out=t)
        np.minimum(dst, t, out=dst)
    np.multiply(left, b, out=left)
    np.add(left, right, out=left)
    return left


def _permute(p: np.ndarray, n, a, b, keys: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The keyed bijection on ``[0, n)`` at positions ``p`` (uint64, all ``< n``): the Feistel
    network on ``[0, a * b)`` with cycle walking. ``n``, ``a``, ``b`` and the keys may be per
    position (arrays like ``p``, keys ``(rounds, len(p))``) or shared (scalars, keys ``(rounds,)``).
    ``inverse=True`` gives the inverse bijection."""
    if len(p) <= _FEW:  # a handful: plain integers cost less than numpy's calls
        return _few(p, np.arange(len(p)), n, a, b, keys, inverse)
    x = _feistel(p, a, b, keys, inverse)
    if np.ndim(n) == 0 and int(a) * int(b) == int(n):
        return x
    out = np.flatnonzero(x >= n)
    while out.size:  # a cycle through [0, n) returns to it: walk the few that fell outside
        if out.size <= _FEW:
            return _few(x, out, n, a, b, keys, inverse)
        y = _feistel(x[out], _at(a, out), _at(b, out), keys[:, out] if keys.ndim == 2 else keys, inverse)
        x[out] = y
        out = out[y >= _at(n, out)]
    return x


def _at(v, where: np.ndarray):
    """``v[where]`` for a per-position array, ``v`` itself for a shared scalar."""
    return v[where] if np.ndim(v) else v


def _few(x: np.ndarray, where: np.ndarray, n, a, b, keys: np.ndarray, inverse: bool) -> np.ndarray:
    """``x`` with the values at ``where`` passed through the network (with cycle walking) in Python ints."""
    x = x.copy()
    for i in where.tolist():
        args = (int(v[i]) if np.ndim(v) else int(v) for v in (n, a, b))
        x[i] = _walk(int(x[i]), *args, (keys[:, i] if keys.ndim == 2 else keys).tolist(), inverse)
    return x


def _walk(x: int, n: int, a: int, b: int, keys: list[int], inverse: bool) -> int:
    """:func:`_feistel` on one Python int (the same arithmetic), once and again while the value is ``>= n``."""
    m1, m2, mask = int(_M1), int(_M2), (1 << 64) - 1
    rounds = range(len(keys) - 1, -1, -1) if inverse else range(len(keys))
    while True:
        left, right = divmod(x, b)
        for i in rounds:
            src, mod = (right, a) if i % 2 == 0 else (left, b)
            t = ((src ^ keys[i]) * m1) & mask
            t = (((t ^ (t >> 31)) * m2) & mask) >> 32
            f = (t * mod) >> 32
            if i % 2 == 0:
                left = (left - f if inverse else left + f) % a
            else:
                right = (right - f if inverse else right + f) % b
        x = left * b + right
        if x < n:
            return x


# --------------------------------------------------------------------------- blocks
class _UniformBlocks:
    """Blocks of ``size`` records, but the first has ``first`` and the last the rest (arithmetic)."""

    def __init__(self, m: int, size: int, first: int) -> None:
        self.size = size
        if first >= m:
            self.count, self.first, self.last = 1, m, m
        else:
            self.count = 1 + -(-(m - first) // size)
            self.first, self.last = first, m - first - (self.count - 2) * size

    def sizes(self, k: np.ndarray) -> np.ndarray:
        out = np.full(k.shape, self.size, dtype=np.int64)
        out[k == self.count - 1] = self.last
        out[k == 0] = self.first
        return out

    def starts(self, k: np.ndarray) -> np.ndarray:
        return np.where(k == 0, 0, self.first + (k - 1) * self.size)


class _ListedBlocks:
    """Blocks at the given sorted starts (beginning at 0) in ``[0, m)``."""

    def __init__(self, starts: np.ndarray, m: int) -> None:
        self._starts = starts
        self._ends = np.append(starts[1:], m)
        self.count = len(starts)

    def sizes(self, k: np.ndarray) -> np.ndarray:
        return self._ends[k] - self._starts[k]

    def starts(self, k: np.ndarray) -> np.ndarray:
        return self._starts[k]


def _bulk(fn, p: np.ndarray) -> np.ndarray:
    """``fn(p)`` in pieces of :data:`_BULK` (the temporaries of a piece stay in cache)."""
    if len(p) <= _BULK:
        return fn(p)
    return np.concatenate([fn(p[i : i + _BULK]) for i in range(0, len(p), _BULK)])


class Sampler:
    """Maps a global step to the record indices of this process's part of that batch.

    Args:
      num_records: records in the source (``len(source)``).
      batch_size: the *global* batch size, summed over all processes. It must divide
        by ``part.count``; each process reads ``batch_size // part.count`` records.
      seed: seeds the shuffle (an integer >= 0). Same seed, same order, on every machine.
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

    Computing a batch costs the same at any ``num_records`` (tens of microseconds, less
    when consecutive steps share a cached chunk) and memory does not grow with it; only
    ``shuffle="block"`` with irregular blocks keeps a table per epoch, of
    ``#blocks / window`` entries.
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
        if num_records > _MAX_RECORDS:
            raise ValueError(f"num_records must be at most 2**62, got {num_records}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % part.count:
            raise ValueError(
                f"global batch_size {batch_size} does not divide among {part.count} processes: "
                f"use a multiple of {part.count} (e.g. {part.count * max(1, batch_size // part.count)})"
            )
        if seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed}")
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
        self._global = part.mode == "global" or part.count == 1  # positions are global positions
        self._first, self._stride = part.layout(self.num_records)
        self._size = self.num_records if part.mode == "global" else part.size(self.num_records)
        self._rank_word = 0 if part.mode == "global" else part.index + 1
        self.steps_per_epoch = self._steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no full batch: {self.num_records} records, global batch size {self.batch_size}, "
                f"{part.count} process(es) in {part.mode!r} mode with drop_remainder=True"
            )
        if self._size == 0:
            raise ValueError(
                f"process {part.index} of {part.count} owns no records: {self.num_records} records "
                f"do not reach every process in {part.mode!r} mode"
            )
        self._block_size: int | None = None  # "block" mode, regular blocks
        self._block_starts: np.ndarray | None = None  # "block" mode, irregular blocks
        self._blocks: _UniformBlocks | _ListedBlocks | None = None
        if shuffle == "block":
            self._parse_blocks(blocks)
            self._blocks = self._local_blocks()
        self._steps_per_chunk = max(1, _CHUNK // self.local_batch_size)
        self._cache: dict = {}  # (epoch, chunk) -> records of those steps; the last two
        self._plans: dict = {}  # epoch -> its keys (and block tables); the last two
        self._cache_lock = threading.Lock()

    # ----------------------------------------------------------------- setup
    def _parse_blocks(self, blocks) -> None:
        n = self.num_records
        if blocks is None:
            raise ValueError('shuffle="block" needs blocks= (a block size, or source.block_starts)')
        if np.isscalar(blocks):
            size = int(blocks)  # type: ignore[arg-type]
            if size < 1:
                raise ValueError(f"block size must be >= 1, got {size}")
            self._block_size = min(size, n)
            return
        starts = np.asarray(blocks, dtype=np.int64)
        if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0):
            raise ValueError("blocks must be a block size or increasing block starts beginning at 0")
        if starts[-1] >= n:
            raise ValueError(f"block start {starts[-1]} is past the last record ({n - 1})")
        size = int(starts[1]) if len(starts) > 1 else n
        if len(starts) == -(-n // size) and np.array_equal(starts, np.arange(0, n, size, dtype=np.int64)):
            self._block_size = size  # evenly spaced: the same blocks as blocks=size
        else:
            self._block_starts = starts

    def _local_blocks(self) -> _UniformBlocks | _ListedBlocks:
        """This process's blocks, in its own positions ``[0, size)``: the source's blocks cut to its part."""
        m, part, size = self._size, self.part, self._block_size
        if size is not None:
            if self._global:
                return _UniformBlocks(m, size, min(size, m))
            if part.mode == "contiguous":
                return _UniformBlocks(m, size, min(m, size - self._first % size))
            if size % part.count == 0:  # interleave: block k holds positions [k * size / count, ...)
                return _UniformBlocks(m, size // part.count, min(size // part.count, m))
            count = -(-self.num_records // size)
            if count > _MAX_TABLE:
                raise ValueError(
                    f"blocks of {size} records do not divide among {part.count} interleaved processes, and "
                    f"their {count} uneven parts are too many to list: use a block size divisible by "
                    f"{part.count} (e.g. {size - size % part.count or part.count}), or mode='contiguous'"
                )
            starts = np.arange(0, self.num_records, size, dtype=np.int64)
        else:
            assert self._block_starts is not None
            starts = self._block_starts
            if self._global:
                return _ListedBlocks(starts, m)
        if part.mode == "contiguous":
            local = np.clip(starts - self._first, 0, m)
        else:  # interleave: the first owned record at or after each start
            local = np.maximum(0, -((part.index - starts) // part.count))
        local = np.unique(local)
        return _ListedBlocks(local[local < m], m)

    def _steps_per_epoch(self) -> int:
        if self.part.mode == "global" or self.part.count == 1:
            n, b = self.num_records, self.batch_size
        else:
            sizes = [self.part.size(self.num_records, i) for i in range(self.part.count)]
            n, b = (min(sizes) if self.drop_remainder else max(sizes)), self.local_batch_size
        return n // b if self.drop_remainder else math.ceil(n / b)

    # ----------------------------------------------------------------- order
    def _plan(self, epoch: int) -> dict:
        """What one epoch's order needs besides the positions: keys, and block tables."""
        plan = self._plans.get(epoch)
        if plan is not None:
            return plan
        m = self._size
        if self.shuffle == "full":
            a, b = _split(m)
            keys = _keys(self.seed, _STREAM_ORDER, epoch, self._rank_word, count=_rounds(a * b))
            plan = {"keys": keys, "n": _U(m), "a": _U(a), "b": _U(b)}
        elif self.shuffle == "block":
            plan = self._block_plan(epoch)
        else:
            plan = {}
        with self._cache_lock:  # prefetch threads may cross an epoch boundary together
            self._plans[epoch] = plan
            while len(self._plans) > 2:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def _block_plan(self, epoch: int) -> dict:
        blocks, w = self._blocks, self.window
        assert blocks is not None
        count = blocks.count
        keys = _keys(self.seed, _STREAM_BLOCKS, epoch, self._rank_word, count=2 * _MAX_ROUNDS)
        a, b = _split(count)
        block_keys = keys[: _rounds(a * b)]
        plan = {"keys": block_keys, "window_keys": keys[_MAX_ROUNDS:], "n": _U(count), "a": _U(a), "b": _U(b), "layouts": {},
                "tables": {}}
        if isinstance(blocks, _UniformBlocks):
            # Every window holds `window` blocks of `size` records, but the ones holding the first
            # and the last block, each short by that block's deficit: past the end of such a
            # window, positions are `deficit` behind a layout of equal windows.
            ends = np.array([0, count - 1], dtype=np.uint64)
            slots = self._block_permute(plan, ends, inverse=True).astype(np.int64) // w
            deficits = [blocks.size - blocks.first, blocks.size - blocks.last] if count > 1 else [0, 0]
            full = w * blocks.size
            short = [(int(slot), d) for slot, d in zip(slots, deficits, strict=True) if d]
            # (the first position past a short window, its deficit): that position is `full` times the
            # windows so far, less the deficits of all the short ones among them (both may be one window)
            plan["shifts"] = [((slot + 1) * full - sum(d2 for s2, d2 in short if s2 <= slot), d) for slot, d in short]
        else:  # windows' cumulative sizes, from every block's size in this epoch's block order
            ids = _bulk(lambda q: self._block_permute(plan, q), np.arange(count, dtype=np.uint64)).astype(np.int64)
            per_window = np.add.reduceat(blocks.sizes(ids), np.arange(0, count, w))
            plan["cum"] = np.concatenate([[0], np.cumsum(per_window)])
        return plan

    def _block_permute(self, plan: dict, q: np.ndarray, inverse: bool = False) -> np.ndarray:
        return _permute(q, plan["n"], plan["a"], plan["b"], plan["keys"], inverse)

    def _locate(self, plan: dict, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(window, its first position)`` of each epoch position ``p`` (int64)."""
        if "cum" in plan:
            j = np.searchsorted(plan["cum"], p, side="right") - 1
            return j, plan["cum"][j]
        blocks = self._blocks
        assert isinstance(blocks, _UniformBlocks)
        regular = p
        for edge, deficit in plan["shifts"]:  # the position in a layout of equal windows
            regular = regular + deficit * (p >= edge)
        j, within = np.divmod(regular, self.window * blocks.size)
        return j, p - within

    def _layouts(self, plan: dict, windows: np.ndarray) -> dict:
        """Windows ``windows`` (sorted int64) of an epoch: each one's blocks (ids, record offsets within
        the window, first records), record count, Feistel halves and round keys, as rows."""
        blocks, w = self._blocks, self.window
        assert blocks is not None
        slots = windows[:, None] * w + np.arange(w)  # the window's places in this epoch's block order
        used = slots < blocks.count
        ids = np.zeros(slots.shape, dtype=np.int64)
        ids[used] = self._block_permute(plan, slots[used].astype(np.uint64)).astype(np.int64)
        sizes = np.where(used, blocks.sizes(ids), 0)
        total = sizes.sum(axis=1).astype(np.uint64)
        a, b = _split_array(total)
        if isinstance(blocks, _UniformBlocks):
            regular = np.all((sizes == blocks.size) | ~used, axis=1)
        else:
            regular = np.zeros(len(windows), dtype=bool)
        return {
            "ids": ids,
            "offsets": np.cumsum(sizes, axis=1) - sizes,
            "firsts": blocks.starts(ids),
            "total": total,
            "a": a,
            "b": b,
            "rounds": _rounds(a * b),
            # the window's own shuffle is keyed by the window alone
            "keys": _mix64(plan["window_keys"][:, None] ^ _mix64(windows.astype(np.uint64) * _GOLDEN)[None, :]),
            "regular": regular,
        }

    def _block_positions(self, plan: dict, p: np.ndarray) -> np.ndarray:
        """This process's record positions at epoch positions ``p`` in ``"block"`` mode."""
        j, base = self._locate(plan, p)
        within = (p - base).astype(np.uint64)
        if len(j) and np.all(j[1:] >= j[:-1]):  # the usual case: runs of consecutive positions
            cuts = np.flatnonzero(j[1:] != j[:-1]) + 1
            if len(cuts) < _RUNS:
                return self._block_runs(plan, j, within, np.concatenate([[0], cuts, [len(j)]]))
        windows, inv = np.unique(j, return_inverse=True)
        lay = self._layouts(plan, windows)
        shuffled = np.empty(len(p), dtype=np.int64)
        per = lay["rounds"][inv]
        for r in np.unique(lay["rounds"]).tolist():  # windows of one round count together
            at = np.flatnonzero(per == r)
            w_at = inv[at]
            shuffled[at] = _permute(within[at], lay["total"][w_at], lay["a"][w_at], lay["b"][w_at], lay["keys"][:r, w_at])
        # which block of its window: the blocks' epoch positions increase along the sorted windows
        starts = np.empty(len(windows), dtype=np.int64)
        starts[inv] = base
        edges = (starts[:, None] + lay["offsets"]).ravel()
        target = base + shuffled
        k = np.searchsorted(edges, target, side="right") - 1
        return lay["firsts"].ravel()[k] + (target - edges[k])

    def _block_runs(self, plan: dict, j: np.ndarray, within: np.ndarray, runs: np.ndarray) -> np.ndarray:
        """:meth:`_block_positions` for a few runs of one window each: a window at a time, its layout
        kept in the epoch's plan for the next batches."""
        cache = plan["layouts"]  # shared by threads: read once, replaced whole when full
        windows = j[runs[:-1]].tolist()
        found = {x: cache.get(x) for x in windows}
        missing = [x for x, v in found.items() if v is None]
        if missing:
            # the windows after the last one come next: lay them out in the same vectorized call
            last = -(-self._blocks.count // self.window) - 1
            ahead = [x for x in range(max(missing) + 1, min(max(missing) + _AHEAD, last) + 1) if x not in cache]
            missing = sorted(set(missing) | set(ahead))
            lay = self._layouts(plan, np.array(missing, dtype=np.int64))
            for r, x in enumerate(missing):
                rounds = int(lay["rounds"][r])
                found[x] = (lay["total"][r], lay["a"][r], lay["b"][r], lay["keys"][:rounds, r].copy(), bool(lay["regular"][r]),
                            lay["offsets"][r], lay["firsts"][r])
            if len(cache) + len(missing) > _LAYOUTS:
                cache.clear()
            cache.update((x, found[x]) for x in missing)
        out = np.empty(len(j), dtype=np.int64)
        tables = plan["tables"]  # window -> its records in order, or None once seen (shared like the layouts)
        for r, x in enumerate(windows):
            lo, hi = runs[r], runs[r + 1]
            entry, table = found[x], tables.get(x)
            if table is None and x in tables and int(entry[0]) <= _TABLE:
                # A window read a second time is being read through over the next batches: evaluate
                # all its positions at once (the same values, far fewer numpy calls per position).
                table = tables[x] = self._window_records(entry, np.arange(int(entry[0]), dtype=np.uint64))
            if table is not None:
                out[lo:hi] = table[within[lo:hi].astype(np.int64)]
                continue
            out[lo:hi] = self._window_records(entry, within[lo:hi])
            if len(tables) >= 4:
                tables.clear()
            tables[x] = None
        return out

    def _window_records(self, entry: tuple, within: np.ndarray) -> np.ndarray:
        """Record positions at positions ``within`` (uint64) of one window, from its layout ``entry``."""
        total, a, b, keys, regular, offsets, firsts = entry
        shuffled = _permute(within, total, a, b, keys).astype(np.int64)
        if regular:  # equal blocks: arithmetic
            k, offset = np.divmod(shuffled, getattr(self._blocks, "size", 0))
        else:
            k = np.searchsorted(offsets, shuffled, side="right") - 1
            offset = shuffled - offsets[k]
        return firsts[k] + offset

    def _positions_at(self, epoch: int, p: np.ndarray) -> np.ndarray:
        """This process's record positions (``[0, size)``) at epoch positions ``p`` (int64, ``< size``)."""
        if self.shuffle == "none":
            return p
        plan = self._plan(epoch)
        if self.shuffle == "full":
            return _permute(p.astype(np.uint64), plan["n"], plan["a"], plan["b"], plan["keys"]).astype(np.int64)
        return self._block_positions(plan, p)

    def _records(self, epoch: int, p: np.ndarray) -> np.ndarray:
        """Record indices at epoch positions ``p`` (int64 array, each ``< size``)."""
        pos = _bulk(lambda q: self._positions_at(epoch, q), p)
        if self._stride != 1 or self._first:
            pos = self._first + pos * self._stride
        return pos

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This process's record indices for one epoch, in visiting order (no padding).

        Builds the whole order (memory grows with the data): for tests and small data;
        :meth:`indices` never needs it.
        """
        return self._records(epoch, np.arange(self._size, dtype=np.int64))

    # ----------------------------------------------------------------- lookup
    def epoch(self, step: int) -> int:
        """The epoch that global step ``step`` belongs to."""
        return step // self.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        """Steps over all epochs, or ``None`` for an endless stream."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def _start(self, within):
        """The first epoch position of this process's part of step ``within`` (of its epoch)."""
        if self._global:
            return within * self.batch_size + self.part.index * self.local_batch_size
        return within * self.local_batch_size

    def _chunk(self, epoch: int, chunk: int) -> np.ndarray:
        """Records of the steps of one chunk of an epoch, one row per step."""
        key = (epoch, chunk)
        rows = self._cache.get(key)
        if rows is None:
            first = chunk * self._steps_per_chunk
            within = np.arange(first, min(first + self._steps_per_chunk, self.steps_per_epoch), dtype=np.int64)
            pos = (self._start(within)[:, None] + np.arange(self.local_batch_size, dtype=np.int64)).ravel()
            if pos[-1] >= self._size:  # a last, short batch: padded by wrapping around the order
                pos %= self._size
            rows = self._records(epoch, pos).reshape(len(within), self.local_batch_size)
            with self._cache_lock:  # prefetch threads may cross a chunk boundary together
                self._cache[key] = rows
                while len(self._cache) > 2:
                    self._cache.pop(next(iter(self._cache)))
        return rows

    def _lookup(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        if step < 0 or (self.total_steps is not None and step >= self.total_steps):
            raise IndexError(f"step {step} is outside [0, {self.total_steps}) ({self.num_epochs} epoch(s))")
        epoch, within = divmod(step, self.steps_per_epoch)
        chunk, row = divmod(within, self._steps_per_chunk)
        idx = self._chunk(epoch, chunk)[row]
        start = self._start(within)
        if start + self.local_batch_size <= self._size:
            return idx, None
        return idx, np.arange(start, start + self.local_batch_size) < self._size

    def indices(self, step: int) -> np.ndarray:
        """Record indices of this process's part of global batch ``step``."""
        return self._lookup(step)[0]

    def indices_and_mask(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(indices(step), mask)``: the mask is ``None`` when every record is real, else ``True``
        for real records and ``False`` for the padding of a last, short batch."""
        return self._lookup(step)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_cache={}, _plans={}, _cache_lock=None)  # workers compute their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    # ----------------------------------------------------------------- identity
    def describe(self) -> str:
        """What decides the order, for the resume fingerprint.

        Leaves out the process index, and in ``global`` mode the process count: a
        state may move to another process (or another number of them in ``global``).
        Ends with the order's version (:data:`ORDER_VERSION`).
        """
        blocks = ""
        if self._block_size is not None:
            blocks = f", blocks=size {self._block_size}, window={self.window}"
        elif self._block_starts is not None:
            digest = hashlib.sha256(self._block_starts.tobytes()).hexdigest()[:12]
            blocks = f", blocks={len(self._block_starts)}:{digest}, window={self.window}"
        part = f"mode={self.part.mode!r}"
        if self.part.mode != "global":
            part += f", count={self.part.count}"
        return (
            f"Sampler(num_records={self.num_records}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle!r}{blocks}, drop_remainder={self.drop_remainder}, {part}, order={ORDER_VERSION})"
        )

    def __repr__(self) -> str:
        return self.describe()[:-1] + f", index={self.part.index}, num_epochs={self.num_epochs})"
