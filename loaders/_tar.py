"""WebDataset tar shards with random access through a cached member index.

The source lives here; the header walk and per-shard index cache in ``_tar_format``, the
combined index every process maps in ``_index``, member decoding in ``_decode``, the batch
gathers in ``_gather``, the collate in ``_collate``.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._bytes import ByteWindows
from ._collate import stack_field, stack_records
from ._decode import INT_EXTS, NPY_HEAD, NpyLayout, decode
from ._errors import DataError
from ._gather import BatchRows, gather_ints, gather_npy
from ._guard import files_digest, watch
from ._index import TarIndex, open_tar_index
from ._shards import expand_shards
from ._span import Span, map_file, map_span
from ._tar_format import default_index_dir

_MAX_OPEN = 128  # shards kept mapped when they are not all in one span (maps hold no file descriptor)


class TarSource:
    """WebDataset tar shards, read at random through a cached member index.

    Args:
      shards: a path, a list, a glob, a brace pattern (``train-{000000..000009}.tar``),
        or an ATEK YAML shard list (``local_train_tars.yaml``).
      keys: the fields (extensions, e.g. ``["npy", "cls"]``) to read; default: every
        field found. Every sample must have every selected field.
      rename: ``{field: output name}`` for the batch dict (ATEK's ``dict_key_mapping``).
      transform: ``fn(sample) -> sample`` applied to each decoded sample (forces the
        per-sample path; prefer the Loader's ``transform`` for random augmentation).
      decoders: ``{extension: fn(bytes) -> value}`` overriding the defaults.
      decode: ``False`` returns raw bytes for every field.
      allow_pickle: unpickle ``.pyd`` / ``.pickle`` / ``.pth`` members. Off by default:
        never unpickle data you did not write.
      index_dir: where shard indexes are cached (default :func:`default_index_dir`).
      progress: show a progress bar while indexes are built.

    The index of every record is cached on disk (in ``index_dir``) and memory-mapped: all
    processes on a node share one copy, and a pickled source carries only its name.

    Batches of uniform ``.npy`` fields are gathered straight from a memory map of
    each shard (headers checked for every record); other fields decode per record.
    Both paths give the same values: ``.npy`` arrays come out in native byte order and
    C order (as the HDF5 sources give them); integer fields (``.cls``) must fit int64.
    """

    data_format = "tar"  # the kind of files it reads: the trainer picks a built-in dataset's files by it

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        keys: Sequence[str] | None = None,
        rename: Mapping[str, str] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        decoders: Mapping[str, Callable[[bytes], Any]] | None = None,
        decode: bool = True,
        allow_pickle: bool = False,
        index_dir: str | None = None,
        progress: bool = False,
    ) -> None:
        paths = expand_shards(shards)
        self._shards: list[str] | None = paths
        self.index_dir = index_dir or default_index_dir()
        self.rename = dict(rename or {})
        self.transform = transform
        self.decoders = dict(decoders or {})
        self.decode = decode
        self.allow_pickle = allow_pickle
        self._ix: TarIndex = open_tar_index(paths, self.index_dir, progress)
        found = self._ix.fields
        self.fields = list(keys) if keys is not None else list(found)
        if not self.fields:
            raise DataError(f"{paths[0]}: no samples (no member names of the form key.ext)")
        missing_everywhere = [f for f in self.fields if f not in found]
        if missing_everywhere:
            raise DataError(
                f"no shard has field(s) {missing_everywhere}; fields found: {found} (in {paths[0]} ...)"
            )
        unknown = set(self.rename) - set(self.fields)
        if unknown:
            raise ValueError(f"rename names fields that are not selected: {sorted(unknown)}")
        self._check_holes()
        if self._ix.n == 0:
            raise DataError(f"{paths[0]}: the shards hold no samples")
        self._v: _View | None = None
        self._lock = threading.Lock()
        self._open: OrderedDict[int, _Mapped] = OrderedDict()
        self._pid: int | None = None
        self._span: Span | None = None
        self._span_pid: int | None = None
        self._npy: dict[tuple[int, int], NpyLayout] = {}
        self._plan = self._make_plan()
        self._content: str | None = None

    def _check_holes(self) -> None:
        """Every selected field in every sample, checked from the counts the index keeps: the
        error names the first shard with a sample lacking one, and that sample."""
        ix = self._ix
        holes = [ix.meta["holes"][ix.fields.index(f)] for f in self.fields]
        firsts = [first for count, first in holes if count]
        if not firsts:
            return
        r = min(firsts)
        s = int(ix.shard_of(np.int64(r)))
        a, b = (int(x) for x in ix.arrays()["starts"][s : s + 2])
        lacking = [ix.column("offsets", f)[a:b] < 0 for f in self.fields]
        j = next(j for j, m in enumerate(lacking) if m[r - a])
        raise DataError(
            f"{self._shard_path(s)}: sample {ix.key(r)!r} has no {self.fields[j]!r} member "
            f"(expected fields {self.fields}; {sum(int(m.sum()) for m in lacking)} missing in this shard). "
            "Select the fields every sample has with keys=[...]"
        )

    @property
    def shards(self) -> list[str]:
        """The shard paths, in order (read from the index in a process that unpickled the source)."""
        if self._shards is None:
            self._shards = self._ix.paths()
        return self._shards

    def _shard_path(self, s: int) -> str:
        return self._shards[s] if self._shards is not None else self._ix.path(s)

    def _view(self) -> _View:
        """This process's arrays of the selected fields (mapped the first time they are needed)."""
        v = self._v
        if v is None:
            v = self._v = _View(self._ix, self.fields)
        return v

    def _shard(self, i: int) -> int:
        return int(np.searchsorted(self._view().starts, i, side="right")) - 1

    # --------------------------------------------------------------- protocol
    def __len__(self) -> int:
        return self._ix.n

    @property
    def keys(self) -> list[str]:
        return [self.rename.get(f, f) for f in self.fields]

    @property
    def block_starts(self) -> np.ndarray:
        """Record offsets where each shard begins (for ``shuffle="block"``)."""
        starts = self._view().starts[:-1]
        return np.unique(starts[starts < len(self)])

    def sample_key(self, index: int) -> str:
        """The WebDataset ``__key__`` of record ``index`` (negative counts from the end)."""
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        return self._ix.key(i)

    def describe(self) -> str:
        """What is read, for the resume fingerprint: shard names, records, fields, and a digest of the
        shards' content (sizes and sampled blocks), so a moved copy matches and other data does not."""
        names = "\n".join(os.path.basename(p) for p in self.shards)
        digest = hashlib.sha256(names.encode()).hexdigest()[:12]
        if self._content is None:
            self._content = files_digest(self.shards)
        first, last = os.path.basename(self.shards[0]), os.path.basename(self.shards[-1])
        return (
            f"TarSource({len(self.shards)} shards {first}..{last} #{digest}, records={len(self)}, "
            f"fields={self.fields}, rename={self.rename}, content={self._content})"
        )

    def __repr__(self) -> str:
        return (f"TarSource({self._shard_path(0)!r}... ({self._ix.n_shards} shards), fields={self.fields}, "
                f"records={len(self)})")

    # --------------------------------------------------------------- reading
    def _map(self, shard: int) -> _Mapped:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid:
                self._open, self._pid = OrderedDict(), pid
            entry = self._open.get(shard)
            if entry is not None:
                self._open.move_to_end(shard)
                return entry
            path = self._shard_path(shard)
            mm = map_file(path)
            end = int(self._view().ends[shard])
            if len(mm) < end:
                raise DataError(f"{path}: the shard shrank since it was indexed ({len(mm)} bytes, index needs {end})")
            watch(path, len(mm))
            entry = _Mapped(mm)
            self._open[shard] = entry
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)
            return entry

    def _where(self, i: int, j: int) -> str:
        return f"{self._shard_path(self._shard(i))}: member {self._ix.key(i)}.{self.fields[j]}"

    def _raw(self, i: int, j: int) -> bytes:
        mm = self._map(self._shard(i)).mm
        v = self._view()
        o, n = int(v.offsets[j][i]), int(v.sizes[j][i])
        return mm[o : o + n].tobytes()

    def _decode_one(self, i: int, j: int) -> Any:
        data = self._raw(i, j)
        ext = self.fields[j]
        if not self.decode:
            return data
        fn = self.decoders.get(ext) or self.decoders.get(ext.rsplit(".", 1)[-1])
        if fn is not None:
            return fn(data)
        return decode(ext, data, _Where(self, i, j), allow_pickle=self.allow_pickle)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        sample = {self.rename.get(f, f): self._decode_one(index, j) for j, f in enumerate(self.fields)}
        return self.transform(sample) if self.transform else sample

    def read_records(self, indices) -> list[dict[str, Any]]:
        """Decoded samples one by one (no stacking: fields may differ in shape)."""
        return [self[i] for i in np.asarray(indices, dtype=np.int64)]

    def read_batch(self, indices) -> dict[str, Any]:
        """Samples ``indices``, decoded and stacked into ``{name: array[len(indices), ...]}``.

        Numbers and equal-shaped arrays stack into arrays; strings become a string
        array; anything else (dicts, bytes) a list.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"record {bad} is out of range [0, {len(self)})")
        if self.transform is not None:
            return stack_records(self.read_records(idx))
        if len(idx) == 0:
            return self._empty_batch()
        out = {}
        rows = self._rows(idx)
        for j, name, how in self._plan:
            if how == "npy":
                out[name] = self._gather_npy(idx, j, rows)
            elif how == "int":
                out[name] = self._gather_int(idx, j, rows)
            else:
                out[name] = self._per_record(idx, j)
        return out

    def _empty_batch(self) -> dict[str, Any]:
        """A batch of no records: ``(0, ...)`` arrays shaped as record 0's, empty lists for other fields."""
        out: dict[str, Any] = {}
        for j, name, how in self._plan:
            if how == "npy":
                lay = self._layout(0, j)
                out[name] = np.empty((0, *lay.shape), dtype=lay.native)
            else:
                out[name] = np.empty(0, dtype=np.int64) if how == "int" else []
        return out

    def _make_plan(self) -> list[tuple[int, str, str | None]]:
        """Per field: its column, its output name, and its batch decoder ("npy", "int" or None)."""
        plan = []
        for j, f in enumerate(self.fields):
            last = f.rsplit(".", 1)[-1]
            default = self.decode and f not in self.decoders and last not in self.decoders
            how = ("npy" if last == "npy" else "int" if last in INT_EXTS else None) if default else None
            plan.append((j, self.rename.get(f, f), how))
        return plan

    def _all_shards(self) -> Span | None:
        """Every shard mapped into one address range (made once per process), or None where
        that is not possible: then batches are gathered shard by shard."""
        pid = os.getpid()
        with self._lock:
            if self._span_pid != pid:
                span = map_span(self.shards)
                if span is not None:
                    ends = self._view().ends
                    short = np.flatnonzero(span.sizes < ends)
                    if len(short):
                        k = int(short[0])
                        raise DataError(
                            f"{self.shards[k]}: the shard shrank since it was indexed "
                            f"({int(span.sizes[k])} bytes, index needs {int(ends[k])})"
                        )
                    for path, size in zip(self.shards, span.sizes.tolist(), strict=True):
                        watch(path, size)
                self._span, self._span_pid = span, pid
            return self._span

    def _rows(self, idx: np.ndarray) -> BatchRows:
        """Where a batch's records lie: found once per batch, used by every field."""
        v = self._view()
        shards = np.searchsorted(v.starts, idx, side="right") - 1
        span = self._all_shards()
        if span is not None:  # one gather per field, whatever the number of shards
            base = span.bases[shards]
            return BatchRows([(span.windows, slice(None))], base, base + v.ends[shards])
        first = int(shards[0])
        if (shards == first).all():
            return BatchRows([(self._map(first).windows, slice(None))], 0, int(v.ends[first]))
        order = np.argsort(shards, kind="stable")
        groups = [(self._map(int(shards[rows[0]])).windows, rows)
                  for rows in np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)]
        return BatchRows(groups, 0, v.ends[shards])

    def _per_record(self, idx: np.ndarray, j: int) -> Any:
        """Field ``j`` of records ``idx`` decoded one by one, then stacked."""
        values = [self._decode_one(int(i), j) for i in idx]
        return stack_field(values, self.fields[j], lambda k: self._where(int(idx[k]), j))

    def _gather_int(self, idx: np.ndarray, j: int, rows: BatchRows) -> np.ndarray:
        """Short decimal members (``.cls``) of a batch, read at once straight from the shard maps;
        the few the gather cannot read (a sign, whitespace, over 18 digits) decode one by one."""
        v = self._view()
        out, slow = gather_ints(rows, v.offsets[j][idx] + rows.base, v.sizes[j][idx])
        for r in np.flatnonzero(slow):
            out[r] = self._decode_one(int(idx[r]), j)
        return out

    def _layout(self, i: int, j: int, fresh: bool = False) -> NpyLayout:
        """The ``.npy`` layout kept for field ``j`` in record ``i``'s shard, parsed from record
        ``i`` when there is none yet or ``fresh`` is set."""
        key = (self._shard(i), j)
        lay = None if fresh else self._npy.get(key)
        if lay is None:
            mm = self._map(key[0]).mm
            v = self._view()
            o = int(v.offsets[j][i])
            lay = NpyLayout(mm[o : o + min(NPY_HEAD, int(v.sizes[j][i]))].tobytes(), _Where(self, i, j))
            self._npy[key] = lay
        return lay

    def _gather_npy(self, idx: np.ndarray, j: int, rows: BatchRows) -> np.ndarray:
        """Copy the data of ``.npy`` members straight out of the shard maps.

        Every member's header is compared with that of the batch's first record, byte for
        byte; a member with another header (shape, dtype, order) takes the per-record path.
        """
        v = self._view()
        offsets, sizes = v.offsets[j][idx] + rows.base, v.sizes[j][idx]
        for fresh in (False, True):
            lay = self._layout(int(idx[0]), j, fresh)
            if lay.fortran:
                return self._per_record(idx, j)
            result, same = gather_npy(rows, offsets, sizes, lay)
            if same[0]:
                break  # else the layout kept for the shard was another record's: parse the first record's
        if not same[0]:  # the first record's own header does not describe its bytes: decode it to say why
            return self._per_record(idx, j)
        for r in [] if same.all() else np.flatnonzero(~same):
            arr = self._decode_one(int(idx[r]), j)
            if arr.shape != lay.shape or arr.dtype != lay.native:
                first = f"{self._ix.key(int(idx[0]))}.{self.fields[j]}"
                raise DataError(
                    f"{self._where(int(idx[r]), j)}: holds {arr.dtype} {arr.shape}, but {first} in the same batch "
                    f"holds {lay.native} {lay.shape}; they cannot be stacked (use read_records or a collate function)"
                )
            result[r] = arr
        return result

    def __getstate__(self) -> dict[str, Any]:
        # The index pickles as its folder's name (its arrays too only where they could not be
        # cached); the shard paths, this process's maps and caches are found again where it is read.
        state = self.__dict__.copy()
        state.update(_lock=None, _open=OrderedDict(), _pid=None, _span=None, _span_pid=None, _v=None, _npy={},
                     _shards=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _View:
    """The index arrays of the selected fields, in one process: where shards start (in records),
    per field the members' offsets and sizes, and where each shard's selected members end."""

    __slots__ = ("starts", "offsets", "sizes", "ends")

    def __init__(self, ix: TarIndex, fields: list[str]) -> None:
        self.starts = ix.arrays()["starts"]
        self.offsets = [ix.column("offsets", f) for f in fields]
        self.sizes = [ix.column("sizes", f) for f in fields]
        self.ends = functools.reduce(np.maximum, [ix.column("ends", f) for f in fields])


class _Mapped:
    """One shard's memory map (a read-only uint8 array) and its byte windows."""

    __slots__ = ("mm", "windows")

    def __init__(self, mm: np.ndarray) -> None:
        self.mm = mm
        self.windows = ByteWindows(mm)


class _Where:
    """'file: member key.ext', formatted only if an error message needs it."""

    __slots__ = ("src", "i", "j")

    def __init__(self, src: TarSource, i: int, j: int) -> None:
        self.src, self.i, self.j = src, i, j

    def __str__(self) -> str:
        return self.src._where(self.i, self.j)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

