"""WebDataset tar shards with random access through a cached member index.

The source lives here; the header walk and index cache in ``_tar_format``, member
decoding in ``_decode``, the batch gathers in ``_gather``, the collate in ``_collate``.
"""

from __future__ import annotations

import hashlib
import mmap
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
from ._progress import progress
from ._shards import expand_shards
from ._span import Span, map_span
from ._tar_format import default_index_dir, load_index

_MAX_OPEN = 128


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
        self.shards = expand_shards(shards)
        self.index_dir = index_dir or default_index_dir()
        self.rename = dict(rename or {})
        self.transform = transform
        self.decoders = dict(decoders or {})
        self.decode = decode
        self.allow_pickle = allow_pickle
        per_shard = []
        bar = _bar(len(self.shards), progress)
        for path in self.shards:
            per_shard.append(load_index(path, self.index_dir)[0])
            bar.update(1)
        bar.close()
        found: list[str] = []
        for ix in per_shard:
            found += [f for f in ix["fields"] if f not in found]
        self.fields = list(keys) if keys is not None else found
        if not self.fields:
            raise DataError(f"{self.shards[0]}: no samples (no member names of the form key.ext)")
        missing_everywhere = [f for f in self.fields if f not in found]
        if missing_everywhere:
            raise DataError(
                f"no shard has field(s) {missing_everywhere}; fields found: {found} (in {self.shards[0]} ...)"
            )
        unknown = set(self.rename) - set(self.fields)
        if unknown:
            raise ValueError(f"rename names fields that are not selected: {sorted(unknown)}")
        self._shard_of, self._offsets, self._sizes, self._keys, starts = [], [], [], [], [0]
        for s, ix in enumerate(per_shard):
            n = len(ix["keys"])
            cols = [ix["fields"].index(f) if f in ix["fields"] else -1 for f in self.fields]
            off = np.full((n, len(self.fields)), -1, dtype=np.int64)
            siz = np.full((n, len(self.fields)), -1, dtype=np.int64)
            for j, c in enumerate(cols):
                if c >= 0:
                    off[:, j], siz[:, j] = ix["offsets"][:, c], ix["sizes"][:, c]
            holes = np.argwhere(off < 0)
            if len(holes):
                i, j = holes[0]
                raise DataError(
                    f"{self.shards[s]}: sample {ix['keys'][i]!r} has no {self.fields[j]!r} member "
                    f"(expected fields {self.fields}; {len(holes)} missing in this shard). "
                    "Select the fields every sample has with keys=[...]"
                )
            self._shard_of.append(np.full(n, s, dtype=np.int32))
            self._offsets.append(off)
            self._sizes.append(siz)
            self._keys.extend(ix["keys"])
            starts.append(starts[-1] + n)
        self._shard_of = np.concatenate(self._shard_of)
        self._offsets = np.concatenate(self._offsets)
        self._sizes = np.concatenate(self._sizes)
        self._shard_starts = np.asarray(starts, dtype=np.int64)
        self._shard_end = np.zeros(len(self.shards), dtype=np.int64)
        np.maximum.at(self._shard_end, self._shard_of, (self._offsets + self._sizes).max(axis=1))
        if len(self._keys) == 0:
            raise DataError(f"{self.shards[0]}: the shards hold no samples")
        self._lock = threading.Lock()
        self._open: OrderedDict[int, _Mapped] = OrderedDict()
        self._pid: int | None = None
        self._span: Span | None = None
        self._span_pid: int | None = None
        self._npy: dict[tuple[int, int], NpyLayout] = {}
        self._plan = self._make_plan()
        self._content: str | None = None

    # --------------------------------------------------------------- protocol
    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[str]:
        return [self.rename.get(f, f) for f in self.fields]

    @property
    def block_starts(self) -> np.ndarray:
        """Record offsets where each shard begins (for ``shuffle="block"``)."""
        starts = self._shard_starts[:-1]
        return np.unique(starts[starts < len(self)])

    def sample_key(self, index: int) -> str:
        """The WebDataset ``__key__`` of record ``index``."""
        return self._keys[index]

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
        return f"TarSource({self.shards[0]!r}... ({len(self.shards)} shards), fields={self.fields}, records={len(self)})"

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
            path = self.shards[shard]
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            end = int(self._shard_end[shard])
            if len(mm) < end:
                raise DataError(f"{path}: the shard shrank since it was indexed ({len(mm)} bytes, index needs {end})")
            watch(path, len(mm))
            entry = _Mapped(mm)
            self._open[shard] = entry
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)
            return entry

    def _where(self, i: int, j: int) -> str:
        s = int(self._shard_of[i])
        return f"{self.shards[s]}: member {self._keys[i]}.{self.fields[j]}"

    def _raw(self, i: int, j: int) -> bytes:
        mm = self._map(int(self._shard_of[i])).mm
        o, n = int(self._offsets[i, j]), int(self._sizes[i, j])
        return mm[o : o + n]

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
                    short = np.flatnonzero(span.sizes < self._shard_end)
                    if len(short):
                        k = int(short[0])
                        raise DataError(
                            f"{self.shards[k]}: the shard shrank since it was indexed "
                            f"({int(span.sizes[k])} bytes, index needs {int(self._shard_end[k])})"
                        )
                    for path, size in zip(self.shards, span.sizes.tolist(), strict=True):
                        watch(path, size)
                self._span, self._span_pid = span, pid
            return self._span

    def _rows(self, idx: np.ndarray) -> BatchRows:
        """Where a batch's records lie: found once per batch, used by every field."""
        shards = self._shard_of[idx]
        span = self._all_shards()
        if span is not None:  # one gather per field, whatever the number of shards
            base = span.bases[shards]
            return BatchRows([(span.windows, slice(None))], base, base + self._shard_end[shards])
        first = int(shards[0])
        if (shards == first).all():
            return BatchRows([(self._map(first).windows, slice(None))], 0, int(self._shard_end[first]))
        order = np.argsort(shards, kind="stable")
        groups = [(self._map(int(shards[rows[0]])).windows, rows)
                  for rows in np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)]
        return BatchRows(groups, 0, self._shard_end[shards])

    def _per_record(self, idx: np.ndarray, j: int) -> Any:
        """Field ``j`` of records ``idx`` decoded one by one, then stacked."""
        values = [self._decode_one(int(i), j) for i in idx]
        return stack_field(values, self.fields[j], lambda k: self._where(int(idx[k]), j))

    def _gather_int(self, idx: np.ndarray, j: int, rows: BatchRows) -> np.ndarray:
        """Short decimal members (``.cls``) of a batch, read at once straight from the shard maps;
        the few the gather cannot read (a sign, whitespace, over 18 digits) decode one by one."""
        out, slow = gather_ints(rows, self._offsets[idx, j] + rows.base, self._sizes[idx, j])
        for r in np.flatnonzero(slow):
            out[r] = self._decode_one(int(idx[r]), j)
        return out

    def _layout(self, i: int, j: int, fresh: bool = False) -> NpyLayout:
        """The ``.npy`` layout kept for field ``j`` in record ``i``'s shard, parsed from record
        ``i`` when there is none yet or ``fresh`` is set."""
        key = (int(self._shard_of[i]), j)
        lay = None if fresh else self._npy.get(key)
        if lay is None:
            mm = self._map(key[0]).mm
            o = int(self._offsets[i, j])
            lay = NpyLayout(mm[o : o + min(NPY_HEAD, int(self._sizes[i, j]))], _Where(self, i, j))
            self._npy[key] = lay
        return lay

    def _gather_npy(self, idx: np.ndarray, j: int, rows: BatchRows) -> np.ndarray:
        """Copy the data of ``.npy`` members straight out of the shard maps.

        Every member's header is compared with that of the batch's first record, byte for
        byte; a member with another header (shape, dtype, order) takes the per-record path.
        """
        offsets, sizes = self._offsets[idx, j] + rows.base, self._sizes[idx, j]
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
                first = f"{self._keys[int(idx[0])]}.{self.fields[j]}"
                raise DataError(
                    f"{self._where(int(idx[r]), j)}: holds {arr.dtype} {arr.shape}, but {first} in the same batch "
                    f"holds {lay.native} {lay.shape}; they cannot be stacked (use read_records or a collate function)"
                )
            result[r] = arr
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _open=OrderedDict(), _pid=None, _span=None, _span_pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _Mapped:
    """One shard's memory map and its byte windows."""

    __slots__ = ("mm", "windows")

    def __init__(self, mm: mmap.mmap) -> None:
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


def _bar(total: int, enabled: bool):
    return progress(total, "indexing shards", enabled and total > 1, unit="shard")
