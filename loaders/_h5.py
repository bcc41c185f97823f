"""HDF5 sources: lazy (read on demand) and cached (this rank's part in shared memory).

Every read returns arrays in native byte order, whichever path read them (the direct
``mmap`` gather, h5py, or the shared-memory cache).

Random single-record reads through HDF5's chunk cache: with any cache of at least one
chunk, each ``f["x"][i]`` pulls (reads and decompresses) the whole chunk holding record
``i``. Measured for 1024x128 float32 chunks: about 11k records/s with such a cache
smaller than the dataset, about 150k/s with ``rdcc_nbytes=0`` (no cache), and about
210k/s with a cache larger than the dataset. ``H5Source`` avoids the question for
uncompressed data (the direct path) and reads whole chunk runs per batch otherwise.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._bytes import ByteWindows
from ._errors import DataError
from ._guard import file_digest, watch
from ._index import INLINE_CHUNKS, chunk_table
from ._part import ProcessPart
from ._progress import progress as _progress
from .shm import SharedArrays


def _h5py():
    import h5py  # imported lazily: a user of tar shards needs no HDF5

    return h5py


def _open(path: str, **cache: Any):
    h5py = _h5py()
    if not os.path.exists(path):
        raise DataError(f"{path}: no such HDF5 file")
    try:
        return h5py.File(path, "r", **{k: v for k, v in cache.items() if v is not None})
    except OSError as e:
        msg = str(e)
        if "signature" in msg:
            raise DataError(f"{path}: not an HDF5 file (no HDF5 signature found)") from e
        if "truncated" in msg or "eof" in msg.lower():
            raise DataError(f"{path}: truncated HDF5 file ({msg})") from e
        raise DataError(f"{path}: cannot open as HDF5: {msg}") from e


def _not_records(ds) -> tuple[str, str] | None:
    """Why ``ds`` cannot hold records, as ``(short reason, sentence)``; None when it can."""
    if ds.shape is None:
        return "empty (NULL dataspace)", "has no data (NULL dataspace)"
    if len(ds.shape) == 0:
        return "scalar", "is a scalar; records need a first dimension"
    return None


def _keys_of(f, path: str, keys: str | Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The dataset names to read, and ``{name: reason}`` for top-level datasets left out.

    By default every top-level dataset with a leading record axis is read; scalars and
    NULL-dataspace datasets (metadata such as ``f["version"] = 3``) are skipped. Asked
    for by name, such a dataset is an error.
    """
    h5py = _h5py()
    if keys is None:
        found: list[str] = []
        skipped: dict[str, str] = {}
        for k in f:
            v = f.get(k)
            if v is None:  # a link to nothing
                skipped[k] = _broken_link(f, k)
                continue
            if not isinstance(v, h5py.Dataset):
                continue
            problem = _not_records(v)
            if problem is None:
                found.append(k)
            else:
                skipped[k] = problem[0]
        if not found:
            if skipped:
                listed = ", ".join(f"{k}: {why}" for k, why in skipped.items())
                raise DataError(f"{path}: no dataset with a record axis at the top level (skipped: {listed}); pass keys=[...]")
            raise DataError(f"{path}: no datasets at the top level; pass keys=[...]")
        return found, skipped
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError(f"{path}: keys is empty")
    for k in keys:
        obj = f.get(k) if k in f else None
        if obj is None:
            if f.get(k, getlink=True) is not None:
                raise DataError(f"{path}: {k!r} leads to no dataset: {_broken_link(f, k)}")
            have = _dataset_names(f)
            raise DataError(f"{path}: no dataset {k!r}; the file has: {', '.join(have) or '(none)'}")
        if isinstance(obj, h5py.Group):
            inside = [f"{k.strip('/')}/{n}" for n in _dataset_names(obj)]
            raise DataError(f"{path}: {k!r} is a group, not a dataset; its datasets: {', '.join(inside) or '(none)'}")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{path}: {k!r} is not a dataset")
        problem = _not_records(obj)
        if problem is not None:
            raise DataError(f"{path}: dataset {k!r} {problem[1]}")
    return keys, {}


def _broken_link(f, name: str) -> str:
    """What a link that resolves to nothing points at (a soft link to a missing path, or an
    external link to a file or dataset that cannot be opened)."""
    link = f.get(name, getlink=True)
    if isinstance(link, _h5py().ExternalLink):
        return f"external link to {link.path!r} in {link.filename!r}, which cannot be opened"
    target = getattr(link, "path", None)
    return f"dangling soft link to {target!r}" if target is not None else "link to nothing"


def _check_virtual(ds, path: str, name: str) -> None:
    """Refuse a virtual dataset whose source file or dataset is missing: HDF5 would return its
    fill value for those records, silently."""
    if not ds.is_virtual:
        return
    h5py = _h5py()
    here = os.path.dirname(os.path.abspath(path))
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    for src in ds.virtual_sources():
        if src.file_name == ".":
            if src.dset_name not in ds.file:
                raise DataError(
                    f"{path}: virtual dataset {name!r} maps dataset {src.dset_name!r} of this file, which does not exist"
                )
            continue
        if "%" in src.file_name:  # a printf-style pattern of many files: HDF5 resolves it per block
            continue
        # HDF5's search: the name as given if absolute, then (the base name of an absolute one)
        # under each HDF5_VDS_PREFIX entry, next to this file, and in the working directory.
        name_ = os.path.basename(src.file_name) if os.path.isabs(src.file_name) else src.file_name
        prefixes = [p.replace("${ORIGIN}", here) for p in (prefix or "").split(":") if p]
        places = [*([src.file_name] if os.path.isabs(src.file_name) else []),
                  *(os.path.join(p, name_) for p in prefixes), os.path.join(here, name_), os.path.abspath(name_)]
        found = next((p for p in places if os.path.exists(p)), None)
        if found is None:
            raise DataError(
                f"{path}: virtual dataset {name!r} maps {src.file_name!r}:{src.dset_name!r}, and that file is missing "
                f"(looked in: {', '.join(places)}); HDF5 would read its records as the fill value"
            )
        try:
            with h5py.File(found, "r") as g:
                ok = src.dset_name in g and isinstance(g.get(src.dset_name), h5py.Dataset)
        except OSError as e:
            raise DataError(f"{path}: virtual dataset {name!r} maps {found!r}, which cannot be opened as HDF5: {e}") from e
        if not ok:
            raise DataError(f"{path}: virtual dataset {name!r} maps dataset {src.dset_name!r} of {found!r}, which does not exist")


def _dataset_names(f) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
    return names


def _check_lengths(path: str, shapes: Mapping[str, tuple], *, chosen: bool) -> int:
    lengths = {k: s[0] for k, s in shapes.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}={n}" for k, n in lengths.items())
        hint = "" if chosen else ": pass keys=[...] to choose"
        raise DataError(
            f"{path}: keys have different lengths ({listed}); all selected keys must share the first dimension{hint}"
        )
    return next(iter(lengths.values()))


def _vlen_kind(dtype: np.dtype) -> str | None:
    """What variable-length (object) data ``dtype`` holds, or None for fixed-size data."""
    if not dtype.hasobject:
        return None
    h5py = _h5py()
    string = h5py.check_string_dtype(dtype)
    if string is not None and string.length is None:
        return f"variable-length strings ({string.encoding})"
    vlen = h5py.check_vlen_dtype(dtype)
    if vlen is not None:
        return f"variable-length arrays of {np.dtype(vlen)}"
    return "variable-length or object data"


def _direct_layout(ds, file_size: int, path: str | None = None) -> np.ndarray | None:
    """File offsets of each row block for an uncompressed dataset, or None.

    Returns an array ``starts`` with one entry per chunk (one entry for a contiguous
    dataset) holding the byte offset of that chunk's first row, when every row can be
    read straight from the file: no filters, chunks spanning whole rows, every chunk
    allocated, and everything inside the file.

    A table of more than ``INLINE_CHUNKS`` chunks of file ``path`` comes from the cache
    (memory-mapped, shared by every process; walked and written there the first time).
    """
    if ds.dtype.kind not in "biuf" or ds.dtype.hasobject or ds.is_virtual or ds.external:
        return None
    row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    if ds.chunks is None:
        offset = ds.id.get_offset()
        if offset is None or offset + row_bytes * ds.shape[0] > file_size:
            return None
        return np.array([offset], dtype=np.int64)
    if ds.id.get_create_plist().get_nfilters() or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None
    rows = ds.chunks[0]
    nchunks = -(-ds.shape[0] // rows)
    if ds.id.get_num_chunks() != nchunks:
        return None  # unallocated chunks hold the fill value, not file bytes
    if path is not None and nchunks > INLINE_CHUNKS:
        return chunk_table(path, ds.name, nchunks, lambda: _chunk_starts(ds, rows, nchunks, row_bytes, file_size))
    return _chunk_starts(ds, rows, nchunks, row_bytes, file_size)


def _chunk_starts(ds, rows: int, nchunks: int, row_bytes: int, file_size: int) -> np.ndarray | None:
    """Where each chunk of ``ds`` (``rows`` rows each) starts in the file, walking the chunk
    index; None if a chunk lies (even partly) outside the file."""
    starts = np.full(nchunks, -1, dtype=np.int64)

    def visit(info):
        starts[info.chunk_offset[0] // rows] = info.byte_offset

    try:
        ds.id.chunk_iter(visit)
    except (AttributeError, NotImplementedError):
        for i in range(nchunks):
            visit(ds.id.get_chunk_info(i))
    if np.any(starts < 0) or starts.max() + rows * row_bytes > file_size:
        return None
    return starts


class _Key:
    """What the source knows about one selected dataset."""

    def __init__(self, name: str, ds, file_size: int, direct: bool, path: str | None = None) -> None:
        self.name = name
        self.shape = tuple(ds.shape)
        self.dtype = ds.dtype
        self.chunk_rows = ds.chunks[0] if ds.chunks else None
        self.row_bytes = ds.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        starts = _direct_layout(ds, file_size, path) if direct else None
        # A long chunk table is mapped from the cache: pickled as its file's name, mapped again where read.
        self._starts_file = starts.filename if isinstance(starts, np.memmap) else None
        self._starts = None if starts is None else starts.view(np.ndarray)  # plain view: no np.memmap indexing cost
        self.native = ds.dtype.newbyteorder("=")  # what reads return (also inside compound fields)

    @property
    def starts(self) -> np.ndarray | None:
        """Where each chunk starts in the file (one entry for a contiguous dataset), or None
        when the dataset is read through h5py."""
        if self._starts is None and self._starts_file is not None:
            try:
                self._starts = np.load(self._starts_file, mmap_mode="r").view(np.ndarray)
            except (OSError, ValueError) as e:
                raise DataError(
                    f"{self._starts_file}: the cached chunk table of dataset {self.name!r} cannot be read ({e}); "
                    "was the cache removed while the data was in use? Open the source again to rebuild it"
                ) from e
        return self._starts

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._starts_file is not None:
            state["_starts"] = None
        return state

    def describe(self) -> str:
        # dtype.str of a compound or subarray dtype is only its size ("|V12"): spell it out then
        plain = self.dtype.names is None and self.dtype.subdtype is None
        dtype = self.dtype.str if plain else str(self.dtype.descr if self.dtype.names else self.dtype)
        return f"{self.name}:{dtype}{list(self.shape)}"


class H5Source:
    """Random access to records of one HDF5 file, read lazily.

    Args:
      path: the HDF5 file.
      keys: dataset names to read (default: every top-level dataset with a leading
        record axis; scalars and NULL-dataspace datasets are skipped and listed in
        :attr:`skipped`). All must share the first dimension, which indexes records.
      rename: optional ``{dataset: output name}`` for the batch dict keys.
      rdcc_nbytes, rdcc_nslots, rdcc_w0: HDF5's chunk cache for this file (h5py's
        defaults when None). Random single-record reads through HDF5 want
        ``rdcc_nbytes=0`` or a cache larger than the data (rates in the module docstring).
      direct: read uncompressed datasets straight from the file's bytes (an ``mmap``
        per process) instead of through HDF5: the fast path for shuffled reads.
        Compressed or unusually chunked datasets always go through h5py.

    The file is opened in the process that reads it (detected by pid), so the
    source can be pickled into fork, spawn or forkserver workers without a
    worker-init hook. ``read_batch`` groups reads: a whole batch costs one gather per
    key on the direct path, and one h5py read per run of touched chunks otherwise.
    Arrays come back in native byte order on every path.
    """

    # The trainer picks files and the process part by these: an HDF5 file, read lazily,
    # so any ProcessPart mode (``global`` included) can drive it.
    data_format = "hdf5"
    holds_part = False

    def __init__(
        self,
        path: str | os.PathLike,
        keys: str | Sequence[str] | None = None,
        *,
        rename: Mapping[str, str] | None = None,
        rdcc_nbytes: int | None = None,
        rdcc_nslots: int | None = None,
        rdcc_w0: float | None = None,
        direct: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._cache_opts = {"rdcc_nbytes": rdcc_nbytes, "rdcc_nslots": rdcc_nslots, "rdcc_w0": rdcc_w0}
        stat = os.stat(self.path) if os.path.exists(self.path) else None
        with _open(self.path, **self._cache_opts) as f:
            names, self._skipped = _keys_of(f, self.path, keys)
            size = stat.st_size if stat else 0
            for k in names:
                _check_virtual(f[k], self.path, k)
            self._keys = [_Key(k, f[k], size, direct, self.path) for k in names]
        self._num_records = _check_lengths(self.path, {k.name: k.shape for k in self._keys}, chosen=keys is not None)
        self._stat = (stat.st_size, stat.st_mtime_ns) if stat else None
        self.rename = dict(rename or {})
        unknown = set(self.rename) - set(names)
        if unknown:
            raise ValueError(f"{self.path}: rename names keys that are not selected: {sorted(unknown)}")
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._file = None
        self._mm: ByteWindows | None = None
        self._content: str | None = None

    # --------------------------------------------------------------- protocol
    def __len__(self) -> int:
        return self._num_records

    @property
    def keys(self) -> list[str]:
        """Output names of the batch dict, in order."""
        return [self.rename.get(k.name, k.name) for k in self._keys]

    @property
    def block_starts(self) -> np.ndarray:
        """Record offsets of the first key's HDF5 chunks (for ``shuffle="block"``)."""
        k = self._keys[0]
        rows = k.chunk_rows or max(1, (1 << 20) // max(1, k.row_bytes))
        return np.arange(0, self._num_records, rows, dtype=np.int64)

    @property
    def skipped(self) -> dict[str, str]:
        """Top-level datasets left out of the default keys, with why (``{"version": "scalar"}``)."""
        return dict(self._skipped)

    def describe(self) -> str:
        """What is read, for the resume fingerprint: file name, records, and each key's dtype and shape."""
        # Skipped datasets are left out on purpose: they are never read, so they cannot
        # change the records. The text is the same as with keys=[the selected names],
        # and a skipped dataset that later gains a record axis joins the default keys
        # and so changes this text anyway.
        keys = ", ".join(k.describe() for k in self._keys)
        if self._content is None:
            self._content = file_digest(self.path)
        return f"H5Source({os.path.basename(self.path)!r}, records={self._num_records}, keys=[{keys}], content={self._content})"

    def __repr__(self) -> str:
        skipped = f", skipped={self._skipped}" if self._skipped else ""
        return f"H5Source({self.path!r}, keys={[k.name for k in self._keys]}, records={self._num_records}{skipped})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch = self.read_batch(np.array([index]))
        return {k: v[0] for k, v in batch.items()}

    def read_records(self, indices) -> list[dict[str, np.ndarray]]:
        """Records one by one (read as one batch, then split)."""
        batch = self.read_batch(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def read_batch(self, indices) -> dict[str, np.ndarray]:
        """Records ``indices`` of every key, stacked: ``{name: array[len(indices), ...]}``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= self._num_records):
            bad = idx[(idx < 0) | (idx >= self._num_records)][0]
            raise IndexError(f"{self.path}: record {bad} is out of range [0, {self._num_records})")
        self._ensure_open()
        out = {}
        for k in self._keys:
            try:
                if k.starts is not None and self._mm is not None:
                    arr = self._read_direct(k, idx)
                else:
                    arr = self._read_h5py(k, idx)
            except (OSError, RuntimeError, KeyError) as e:
                raise DataError(
                    f"{self.path}: reading {k.name!r} records {idx.min()}..{idx.max()} failed: {e}"
                ) from e
            out[self.rename.get(k.name, k.name)] = arr
        return out

    # --------------------------------------------------------------- reading
    def _ensure_open(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            stat = os.stat(self.path) if os.path.exists(self.path) else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != self._stat:
                raise DataError(f"{self.path}: the file changed or vanished since this source was created")
            self._file = _open(self.path, **self._cache_opts)
            self._mm = None
            if any(k.starts is not None for k in self._keys):
                self._mm = ByteWindows(np.memmap(self.path, dtype=np.uint8, mode="r"))
                watch(self.path, self._stat[0])
            self._pid = pid

    def _read_direct(self, k: _Key, idx: np.ndarray) -> np.ndarray:
        assert self._mm is not None and k.starts is not None
        if k.chunk_rows is None:
            offsets = k.starts[0] + idx * k.row_bytes
        else:
            chunk, row = np.divmod(idx, k.chunk_rows)
            offsets = k.starts[chunk] + row * k.row_bytes
        rows = self._mm.get(k.row_bytes)[offsets]
        arr = rows.view(k.dtype).reshape((len(idx), *k.shape[1:]))
        return arr if k.dtype.isnative else arr.astype(k.native)

    def _read_h5py(self, k: _Key, idx: np.ndarray) -> np.ndarray:
        ds = self._file[k.name]
        uniq, inverse = np.unique(idx, return_inverse=True)
        if len(uniq) == 0:
            return np.empty((0, *k.shape[1:]), dtype=k.native)
        # Native byte order: h5py returns the file's (e.g. big-endian) order; the
        # assignments below convert slab by slab.
        out = np.empty((len(uniq), *k.shape[1:]), dtype=k.native)
        # Read runs of touched chunks (or the spanned range of a contiguous dataset)
        # as slabs: each chunk is read and decompressed once per batch.
        rows = k.chunk_rows or max(1, len(uniq))
        chunks = uniq // rows
        run_starts = np.flatnonzero(np.diff(chunks, prepend=chunks[0] - 2) > 1)
        run_ends = np.append(run_starts[1:], len(uniq))
        for a, b in zip(run_starts, run_ends, strict=True):
            lo = int(uniq[a]) if k.chunk_rows is None else int(chunks[a]) * rows
            hi = int(uniq[b - 1]) + 1
            if k.chunk_rows is None and hi - lo > 4 * (b - a):
                out[a:b] = ds[uniq[a:b]]  # sparse rows of a contiguous dataset: one selection
            else:
                out[a:b] = ds[lo:hi][uniq[a:b] - lo]
        return out[inverse.reshape(-1)]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _pid=None, _file=None, _mm=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class H5CachedSource:
    """This rank's part of an HDF5 file, loaded into memory once and shared.

    Loads only the records ``part`` owns (``contiguous`` or ``interleave``; with one
    process, everything) into one shared-memory segment. Worker processes map the same
    pages read-only: no copy per worker, forked or spawned. On Linux the segment is an
    anonymous memfd, freed by the kernel when the last process using it ends, however
    it ends; elsewhere a named segment removed when the owner exits, raises or is
    killed (then by Python's resource tracker). See :mod:`loaders.shm`.

    Indices stay *global* record numbers, so the same :class:`Sampler` (built with the
    same ``part``) drives it; asking for a record outside this rank's part is an error.
    ``block_starts`` are the file's chunk starts in global record numbers, as
    :class:`H5Source` gives them; the Sampler maps them onto the part itself.

    Keys, ``rename`` and :attr:`skipped` work as in :class:`H5Source`; arrays come out
    with the same (native byte order) dtypes, compound and fixed-length string dtypes
    included. Variable-length data (``h5py.string_dtype()``, ``h5py.vlen_dtype``) is
    refused: Python objects cannot live in shared memory.
    """

    # The trainer picks files and the process part by these: an HDF5 file, of which this
    # source loads only one process's part, so its Sampler needs the same
    # ``contiguous``/``interleave`` ProcessPart, passed here as ``part=``.
    data_format = "hdf5"
    holds_part = True

    def __init__(
        self,
        path: str | os.PathLike,
        keys: str | Sequence[str] | None = None,
        *,
        part: ProcessPart | None = None,
        rename: Mapping[str, str] | None = None,
        share: bool = True,
        progress: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.part = part or ProcessPart()
        if self.part.mode == "global" and self.part.count > 1:
            raise ValueError(
                "H5CachedSource holds one rank's part: use ProcessPart(mode='contiguous' or 'interleave'), "
                f"got mode='global' with {self.part.count} processes"
            )
        lazy = H5Source(self.path, keys, rename=rename)
        for k in lazy._keys:
            kind = _vlen_kind(k.dtype)
            if kind is not None:
                raise DataError(
                    f"{self.path}: dataset {k.name!r} holds {kind}, which cannot be placed in shared memory: "
                    "read it with H5Source (lazy), or pass keys=[...] without it"
                )
        self._num_records = len(lazy)
        self._describe_keys = ", ".join(k.describe() for k in lazy._keys)
        self._content = file_digest(self.path)
        self._skipped = lazy.skipped
        self._block_starts = lazy.block_starts
        part = self.part.records(self._num_records)
        self._part_size = len(part)
        specs = {lazy.rename.get(k.name, k.name): ((len(part), *k.shape[1:]), k.native) for k in lazy._keys}
        self._arrays = SharedArrays(specs, share=share)
        step = max(1, (64 << 20) // max(1, sum(k.row_bytes for k in lazy._keys)))
        bar = _progress(len(part), f"caching {os.path.basename(self.path)}", progress)
        for a in range(0, len(part), step):
            batch = lazy.read_batch(part[a : a + step])
            for name, arr in batch.items():
                self._arrays.arrays[name][a : a + len(arr)] = arr
            bar.update(min(step, len(part) - a))
        bar.close()
        self._arrays.freeze()

    def __len__(self) -> int:
        return self._num_records

    @property
    def keys(self) -> list[str]:
        """Output names of the batch dict, in order."""
        return list(self._arrays.arrays)

    @property
    def block_starts(self) -> np.ndarray:
        """Global record offsets of the file's chunks, as :attr:`H5Source.block_starts` (for ``shuffle="block"``)."""
        return self._block_starts

    @property
    def skipped(self) -> dict[str, str]:
        """Top-level datasets left out of the default keys, with why."""
        return dict(self._skipped)

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's part held in memory."""
        return self._arrays.nbytes

    @property
    def shm_name(self) -> str | None:
        """A label of the shared-memory segment (``memfd:...`` on Linux: anonymous, nothing in ``/dev/shm``)."""
        return self._arrays.name

    def describe(self) -> str:
        """What is read, for the resume fingerprint (skipped datasets left out, as in H5Source)."""
        return (
            f"H5CachedSource({os.path.basename(self.path)!r}, records={self._num_records}, "
            f"keys=[{self._describe_keys}], content={self._content})"
        )

    def __repr__(self) -> str:
        s = self.part
        return (
            f"H5CachedSource({self.path!r}, keys={self.keys}, records={self._num_records}, "
            f"part={self._part_size} ({s.mode} {s.index}/{s.count})"
            + (f", skipped={self._skipped})" if self._skipped else ")")
        )

    def _local(self, idx: np.ndarray) -> np.ndarray:
        s = self.part
        if s.count == 1:
            local = idx
        elif s.mode == "contiguous":
            local = idx - s.bounds(self._num_records)[0]
        else:
            local = (idx - s.index) // s.count
        bad = (local < 0) | (local >= self._part_size)
        if s.mode == "interleave" and s.count > 1:
            bad |= (idx - s.index) % s.count != 0
        if np.any(bad):
            raise IndexError(
                f"{self.path}: record {idx[bad][0]} is not in this rank's part ({s.mode} {s.index}/{s.count}); "
                "build the Sampler with the same ProcessPart as the H5CachedSource"
            )
        return local

    def read_batch(self, indices) -> dict[str, np.ndarray]:
        """Records ``indices`` (global numbers) of every key, stacked."""
        idx = np.asarray(indices, dtype=np.int64)
        local = self._local(idx)
        return {k: v[local] for k, v in self._arrays.arrays.items()}

    def read_records(self, indices) -> list[dict[str, np.ndarray]]:
        """Records one by one (read as one batch, then split)."""
        batch = self.read_batch(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.read_batch(np.array([index])).items()}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """This rank's part of each key, read-only and not copied: row ``p`` is record
        ``part.records(len(self))[p]``. For adapters that hand out views (``torch.from_numpy``)."""
        return dict(self._arrays.arrays)

    def close(self) -> None:
        """Release the shared memory now (the owner also does this at exit)."""
        self._arrays.close()

    def __enter__(self) -> H5CachedSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
