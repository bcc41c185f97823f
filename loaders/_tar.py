"""WebDataset tar shards with random access through a cached member index.

The source lives here; the header walk and per-shard index cache in ``_tar_format``, the
combined index every process maps in ``_index``, member decoding in ``_decode``, the batch
gathers in ``_gather``, the collate in ``_collate``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._bytes import ByteWindows
from ._collate import stack_field, stack_records
from ._decode import IMAGE_EXTS, INT_EXTS, NPY_HEAD, NpyLayout, check_image_spec, decode
from ._errors import DataError
from ._gather import BatchRows, gather_ints, gather_npy
from ._guard import files_digest, watch
from ._index import TarIndex, open_tar_index
from ._remote import CachedShards, needs_cache, shard_basename
from ._shards import resolve_shards
from ._span import Span, map_file, map_span
from ._tar_format import default_index_dir

_MAX_OPEN = 128  # shards kept mapped when they are not all in one span (maps hold no file descriptor)
META_FIELDS = ("__key__", "__url__")  # webdataset's sample key and shard, as fields on request
INCOMPLETE = ("error", "skip")


class TarSource:
    """WebDataset tar shards, read at random through a cached member index.

    Args:
      shards: a path, a list, a glob, a brace pattern (``train-{000000..000009}.tar``),
        or an ATEK YAML shard list (``local_train_tars.yaml``, ``streamable_train_tars.yaml``).
        URLs (``https://``, and ``s3://``, ``gs://``, ... through fsspec) and ``.tar.gz`` /
        ``.tgz`` files are fetched whole into the shard cache (``cache_dir``), then read as
        local files.
      keys: the fields (extensions, e.g. ``["npy", "cls"]``) to read; default: every
        field found. ``"__key__"`` and ``"__url__"`` add webdataset's sample key and the
        shard it came from (as given) as string fields. Every sample must have every
        selected field, unless ``incomplete="skip"``.
      rename: ``{field: output name}`` for the batch dict (ATEK's ``dict_key_mapping``).
      transform: ``fn(sample) -> sample`` applied to each decoded sample (forces the
        per-sample path; prefer the Loader's ``transform`` for random augmentation).
      decoders: ``{extension: fn(bytes) -> value}`` overriding the defaults.
      decode: ``False`` returns raw bytes for every field.
      allow_pickle: unpickle ``.pyd`` / ``.pickle`` / ``.pkl`` members, and ``.pth``
        members beyond what ``torch.load(weights_only=True)`` reads. Off by default:
        never unpickle data you did not write.
      image: how image members (``.jpg``, ``.png``, ...) decode: None (the default) as
        stored, palette images expanded to RGB(A); or one of webdataset's specs
        (``"rgb8"``, ``"rgba8"``, ``"l8"``: uint8; ``"rgb"``, ``"rgba"``, ``"l"``: float32
        in [0, 1]; ``"pil"``, ``"pilrgb"``, ``"pilrgba"``, ``"pill"``: PIL images), which
        convert every mode (palette, CMYK, grayscale, RGBA) to one: a shard of mixed
        JPEGs then stacks into one batch array.
      incomplete: what a sample lacking a selected field does: ``"error"`` (the default)
        names the shard and sample; ``"skip"`` leaves such samples out. The set of records
        is decided from the index when the source opens (a pure function of the shards and
        the selected fields), so ``len``, the sampler's order and a resume state are the
        same in every process and run; :attr:`skipped` counts what was left out.
      index_dir: where shard indexes are cached (default :func:`default_index_dir`).
      progress: show a progress bar while indexes are built (and shards downloaded to be indexed).
      cache_dir: where remote (``https://``, ``s3://``, ...) and compressed (``.tar.gz``,
        ``.tgz``) shards are kept once fetched (default ``$TANDEM_CACHE_DIR/shards``); the
        processes of a node share it, each shard fetched once.
      cache_limit: bytes that folder may hold (None: no bound). Least recently used shards
        are deleted to stay under it, never the ones the next steps need; a shard a batch
        needs now may take it one shard over.
      lookahead: steps ahead whose shards a :class:`Loader` fetches in the background
        (as many of them as fit in ``cache_limit``); 0 fetches only on demand.
      manifest: checksums of the shards: a ``sha256sum``-style file or a JSON/YAML mapping
        ``{name: {"sha256": ..., "size": ...}}`` (see :func:`loaders._shards.read_manifest`).
        A fetched shard that does not match is deleted and is an error, never read.
      fetch_options: how shards are fetched: ``retries`` (6), ``backoff`` (0.5 s, doubled
        each retry), ``timeout`` (60 s of silence), ``workers`` (4 downloads at once).

    Member names, decoders and images follow webdataset's rules (``.gz`` decompressed then
    decoded by the inner extension, ``.json``/``.jsn``, ``.npz``, msgpack, CBOR with cbor2,
    tenbin, ``.pth``, ``__meta__/...`` skipped; see :func:`loaders._decode.decode`). A
    sample's members must be consecutive in its shard (webdataset would split the others
    into partial samples): a key whose members are apart is a :class:`DataError`.

    The index of every record is cached on disk (in ``index_dir``) and memory-mapped: all
    processes on a node share one copy, and a pickled source carries only its name.

    Batches of uniform ``.npy`` fields are gathered straight from a memory map of
    each shard (headers checked for every record); other fields decode per record.
    Both paths give the same values: ``.npy`` arrays come out in native byte order and
    C order (as the HDF5 sources give them); integer fields (``.cls``) must fit int64.
    """

    data_format = "tar"  # the kind of files it reads: the trainer picks a built-in dataset's files by it
    skipped: int  # incomplete samples left out (incomplete="skip"); 0 otherwise

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
        image: str | None = None,
        incomplete: str = "error",
        index_dir: str | None = None,
        progress: bool = False,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        lookahead: int = 16,
        manifest: str | os.PathLike | Mapping[str, Any] | None = None,
        fetch_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.image = check_image_spec(image)
        if incomplete not in INCOMPLETE:
            raise ValueError(f"incomplete={incomplete!r}: expected 'error' or 'skip'")
        paths, checks = resolve_shards(shards, dict(manifest) if isinstance(manifest, Mapping) else manifest)
        # Remote and compressed shards are fetched whole into the bounded shard cache, then read as local files.
        self.shard_cache = (CachedShards(paths, checks, cache_dir, cache_limit, progress=progress, **(fetch_options or {}))
                            if any(needs_cache(p) for p in paths) else None)
        self.lookahead = max(0, int(lookahead)) if self.shard_cache is not None else 0
        self._shards: list[str] | None = paths
        self.index_dir = index_dir or default_index_dir()
        self.rename = dict(rename or {})
        self.transform = transform
        self.decoders = dict(decoders or {})
        self.decode = decode
        self.allow_pickle = allow_pickle
        self._ix: TarIndex = open_tar_index(paths, self.index_dir, progress, cached=self.shard_cache)
        found = self._ix.fields
        self.fields = list(keys) if keys is not None else list(found)
        if not self.fields:
            raise DataError(f"{paths[0]}: no samples (no member names of the form key.ext)")
        missing_everywhere = [f for f in self.fields if f not in found and f not in META_FIELDS]
        if missing_everywhere:
            raise DataError(
                f"no shard has field(s) {missing_everywhere}; fields found: {found} (in {paths[0]} ...)"
            )
        unknown = set(self.rename) - set(self.fields)
        if unknown:
            raise ValueError(f"rename names fields that are not selected: {sorted(unknown)}")
        self.incomplete = incomplete
        self._v: _View | None = None
        self._keep: np.ndarray | None = None  # with incomplete="skip": the complete records (mapped once per process)
        self._n = self._ix.n
        self.skipped = 0
        if self._ix.n and self._holes():
            if incomplete == "error":
                self._check_holes()
            self._n = len(self._kept())
            self.skipped = self._ix.n - self._n
            if self._n == 0:
                raise DataError(f"{paths[0]}: no sample has every selected field {self._members()} "
                                f"({self.skipped} incomplete samples skipped)")
        if self._ix.n == 0:
            raise DataError(f"{paths[0]}: the shards hold no samples")
        self._lock = threading.Lock()
        self._open: OrderedDict[int, _Mapped] = OrderedDict()
        self._pid: int | None = None
        self._span: Span | None = None
        self._span_pid: int | None = None
        self._npy: dict[tuple[int, int], NpyLayout] = {}
        self._plan = self._make_plan()
        self._content: str | None = None

    def _members(self) -> list[str]:
        """The selected fields that are tar members (not ``__key__``/``__url__``)."""
        return [f for f in self.fields if f not in META_FIELDS]

    def _holes(self) -> bool:
        """Whether some sample lacks a selected member (from the counts the index keeps)."""
        ix = self._ix
        return any(ix.meta["holes"][ix.fields.index(f)][0] for f in self._members())

    def _check_holes(self) -> None:
        """Every selected field in every sample, checked from the counts the index keeps: the
        error names the first shard with a sample lacking one, and that sample."""
        ix = self._ix
        members = self._members()
        holes = [ix.meta["holes"][ix.fields.index(f)] for f in members]
        firsts = [first for count, first in holes if count]
        if not firsts:
            return
        r = min(firsts)
        s = int(ix.shard_of(np.int64(r)))
        a, b = (int(x) for x in ix.arrays()["starts"][s : s + 2])
        lacking = [ix.column("offsets", f)[a:b] < 0 for f in members]
        j = next(j for j, m in enumerate(lacking) if m[r - a])
        raise DataError(
            f"{self._shard_path(s)}: sample {ix.key(r)!r} has no {members[j]!r} member "
            f"(expected fields {members}; {sum(int(m.sum()) for m in lacking)} missing in this shard). "
            "Select the fields every sample has with keys=[...], or skip incomplete samples with incomplete='skip'"
        )

    def _kept(self) -> np.ndarray:
        """With ``incomplete="skip"``: the combined index's records that have every selected member,
        in order. A pure function of the shards and the selection: cached beside the combined index
        (shared by every process of the node, never pickled), computed again where it cannot be."""
        keep = self._keep
        if keep is not None:
            return keep
        members = self._members()
        folder = self._ix.folder
        digest = hashlib.sha256(json.dumps(members).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        file = os.path.join(folder, f"complete-{digest}.npy") if folder is not None else None
        if file is not None:
            with contextlib.suppress(OSError, ValueError):
                keep = np.load(file, mmap_mode="r", allow_pickle=False)
                if keep.dtype != np.int64 or keep.ndim != 1 or len(keep) > self._ix.n or (
                        len(keep) and not 0 <= int(keep[0]) <= int(keep[-1]) < self._ix.n):
                    keep = None
        if keep is None:
            v = self._view()
            complete = np.ones(self._ix.n, dtype=bool)
            for col in v.offsets:
                if col is not None:
                    complete &= col >= 0
            keep = np.flatnonzero(complete).astype(np.int64)
            if file is not None:
                tmp = f"{file}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        np.save(f, keep, allow_pickle=False)
                    os.replace(tmp, file)
                    keep = np.load(file, mmap_mode="r", allow_pickle=False)
                except OSError:  # a read-only cache: this process keeps its own copy
                    with contextlib.suppress(OSError):
                        os.remove(tmp)
        self._keep = keep.view(np.ndarray) if isinstance(keep, np.memmap) else keep
        return self._keep

    def _records(self, idx: np.ndarray) -> np.ndarray:
        """The combined index's records of public record numbers ``idx`` (the same but where
        incomplete samples are skipped)."""
        return self._kept()[idx] if self.skipped else idx

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
        return self._n

    @property
    def found_fields(self) -> list[str]:
        """Every field (extension) some sample of the shards has, whether selected or not."""
        return list(self._ix.fields)

    @property
    def keys(self) -> list[str]:
        """The names of a record's fields, in order (after ``rename``)."""
        return [self.rename.get(f, f) for f in self.fields]

    @property
    def block_starts(self) -> np.ndarray:
        """Record offsets where each shard begins (for ``shuffle="block"``)."""
        starts = self._view().starts[:-1]
        if self.skipped:
            starts = np.searchsorted(self._kept(), starts)
        return np.unique(starts[starts < len(self)])

    def sample_key(self, index: int) -> str:
        """The WebDataset ``__key__`` of record ``index`` (negative counts from the end)."""
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        return self._ix.key(int(self._records(np.int64(i))))

    def describe(self) -> str:
        """What is read, for the resume fingerprint: shard names, records, fields, and a digest of the
        shards' content (sizes and sampled blocks), so a moved copy matches and other data does not."""
        base = os.path.basename if self.shard_cache is None else shard_basename  # a URL's or .tgz's name as a copy's
        names = "\n".join(base(p) for p in self.shards)
        digest = hashlib.sha256(names.encode()).hexdigest()[:12]
        if self._content is None:  # cached shards: their digests taken when indexed (no download)
            self._content = (files_digest(self.shards) if self.shard_cache is None
                             else self.shard_cache.content_digest(self._ix.meta["digests"]))
        first, last = base(self.shards[0]), base(self.shards[-1])
        return (
            f"TarSource({len(self.shards)} shards {first}..{last} #{digest}, records={len(self)}, "
            f"fields={self.fields}, rename={self.rename}, content={self._content})"
        )

    def __repr__(self) -> str:
        skipped = f", skipped {self.skipped} incomplete" if self.skipped else ""
        return (f"TarSource({self._shard_path(0)!r}... ({self._ix.n_shards} shards), fields={self.fields}, "
                f"records={len(self)}{skipped})")

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
        cache = self.shard_cache
        local = path if cache is None else cache.local(shard)  # a download, if need be: outside the lock
        for attempt in range(3):
            try:
                mm = map_file(local)
                break
            except FileNotFoundError:  # evicted by another process between fetch and map: fetch it again
                if cache is None:
                    raise
                if attempt == 2:
                    raise DataError(f"{path}: evicted from {cache.cache_dir} by other processes each time it was "
                                    f"fetched; the processes sharing it need a larger cache_limit") from None
                local = cache.local(shard)
        where = path if local == path else f"{path} (cached as {local})"
        end = int(self._view().ends[shard])
        if len(mm) < end:
            raise DataError(f"{where}: the shard shrank since it was indexed ({len(mm)} bytes, index needs {end})")
        watch(local, len(mm))
        with self._lock:
            entry = self._open.get(shard)
            if entry is None:
                entry = self._open[shard] = _Mapped(mm)
                if len(self._open) > _MAX_OPEN:
                    self._open.popitem(last=False)
                if cache is not None:  # let go of shards evicted from the cache, so their disk space is freed
                    for s in [s for s in self._open if s != shard and cache.local_if_cached(s) is None]:
                        del self._open[s]
            self._open.move_to_end(shard)
            return entry

    def prefetch(self, batches: Sequence[np.ndarray]) -> bool:
        """Record indices of the coming steps, in the order they will be read (the :class:`Loader`
        calls this from a thread of its own): their remote or compressed shards are pinned in the
        shard cache and fetched in the background, as many as fit in ``cache_limit``.

        Returns False when nothing will ever need fetching in this process (local shards; or
        no ``cache_limit`` and every shard cached), so the caller may stop asking."""
        cache = self.shard_cache
        if cache is None or cache.settled:
            return False
        if not len(batches):
            return True
        idx = self._records(np.concatenate([np.asarray(b, dtype=np.int64).ravel() for b in batches]))
        shards = np.searchsorted(self._view().starts, idx, side="right") - 1
        count = self._ix.n_shards
        if count <= 8 * len(shards):  # each shard's first position, with no sort of all the positions
            first = np.full(count, len(shards), dtype=np.int64)
            np.minimum.at(first, shards, np.arange(len(shards)))
            wanted = np.flatnonzero(first < len(shards))
            order = wanted[np.argsort(first[wanted], kind="stable")]
        else:
            unique, pos = np.unique(shards, return_index=True)
            order = unique[np.argsort(pos, kind="stable")]
        cache.want(order.tolist())
        return True

    def _where(self, i: int, j: int) -> str:
        return f"{self._shard_path(self._shard(i))}: member {self._ix.key(i)}.{self.fields[j]}"

    def _raw(self, i: int, j: int) -> bytes:
        mm = self._map(self._shard(i)).mm
        v = self._view()
        o, n = int(v.offsets[j][i]), int(v.sizes[j][i])
        return mm[o : o + n].tobytes()

    def _decode_one(self, i: int, j: int) -> Any:
        """Field ``j`` of record ``i`` of the combined index, decoded (``__key__``/``__url__``: strings)."""
        ext = self.fields[j]
        if ext in META_FIELDS:
            return self._ix.key(i) if ext == "__key__" else self._shard_path(self._shard(i))
        data = self._raw(i, j)
        if not self.decode:
            return data
        fn = self.decoders.get(ext) or self.decoders.get(ext.rsplit(".", 1)[-1])
        if fn is not None:
            return fn(data)
        return decode(ext, data, _Where(self, i, j), allow_pickle=self.allow_pickle, image=self.image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        i = int(self._records(np.int64(index)))
        sample = {self.rename.get(f, f): self._decode_one(i, j) for j, f in enumerate(self.fields)}
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
        idx = self._records(idx)
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
        """A batch of no records: ``(0, ...)`` arrays shaped as record 0's, empty lists for other fields
        (empty string arrays for ``__key__``/``__url__``)."""
        out: dict[str, Any] = {}
        for j, name, how in self._plan:
            if how == "npy":
                lay = self._layout(int(self._records(np.int64(0))), j)
                out[name] = np.empty((0, *lay.shape), dtype=lay.native)
            elif self.fields[j] in META_FIELDS:
                out[name] = np.empty(0, dtype=str)
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
        if self.shard_cache is not None:  # cached shards come and go: one span of them all only where none is evicted
            return self.shard_cache.span(self._ix)
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
        field = self.fields[j]
        hint = ""
        if self.decode and self.image is None and field.rsplit(".", 1)[-1] in IMAGE_EXTS:
            hint = "; for images of several modes, TarSource(image='rgb8') converts them all to RGB"
        return stack_field(values, field, lambda k: self._where(int(idx[k]), j), hint)

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
                     _shards=None, _keep=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _View:
    """The index arrays of the selected fields, in one process: where shards start (in records),
    per field the members' offsets and sizes (None for ``__key__``/``__url__``, which are no
    members), and where each shard's selected members end."""

    __slots__ = ("starts", "offsets", "sizes", "ends")

    def __init__(self, ix: TarIndex, fields: list[str]) -> None:
        self.starts = ix.arrays()["starts"]
        self.offsets = [None if f in META_FIELDS else ix.column("offsets", f) for f in fields]
        self.sizes = [None if f in META_FIELDS else ix.column("sizes", f) for f in fields]
        ends = [ix.column("ends", f) for f in fields if f not in META_FIELDS]
        self.ends = functools.reduce(np.maximum, ends) if ends else np.zeros(ix.n_shards, dtype=np.int64)


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

