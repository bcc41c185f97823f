"""Indexes shared by every process on a node: raw ``.npy`` files in the cache, memory-mapped.

A tar source's per-record index (where each member lies) is one combined index for its whole
shard list; an HDF5 dataset's chunk table is one array. Both are written once into the cache
folder and mapped read-only with ``np.load(..., mmap_mode="r")``: every process and worker
reading the same data shares one copy through the page cache, and a pickled source carries
only the folder's name and a little metadata, whatever the number of records.

The combined tar index lives in a folder named by a digest of the shard list (paths as given,
the files they lead to, sizes, modification times, :data:`INDEX_VERSION`): any change to a shard names
another folder, built from the per-shard caches of ``_tar_format`` (only changed shards are
scanned again). Folders are written whole under a temporary name and renamed into place, so
processes racing to build the same one never see half of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._errors import DataError
from ._guard import file_digest
from ._progress import progress as _progress
from ._remote import CachedShards, cache_key
from ._tar_format import INDEX_VERSION, _read_index, default_index_dir, load_index, scan_tar

SET_PREFIX = "set-"  # combined indexes: <index_dir>/set-<digest>/
INLINE_CHUNKS = 4096  # HDF5 chunk tables up to this length stay in the source (and its pickle)


def _tmp_name(final: str) -> str:
    return f"{os.path.dirname(final)}{os.sep}.{os.path.basename(final)}.{os.getpid()}.{threading.get_ident()}.tmp"


def _mapped(file: str) -> np.ndarray:
    """The array saved in ``file``, memory-mapped read-only."""
    return np.load(file, mmap_mode="r", allow_pickle=False)


# --------------------------------------------------------------------------- tar: the combined index
class TarIndex:
    """The combined index of a shard list: per field ``offsets`` and ``sizes`` columns (int64, one
    entry per record, -1 where a record lacks the field), per field the end of the indexed bytes
    of each shard, the record where each shard starts (``n_shards + 1`` entries), and the keys and
    shard paths as utf-8 blobs with offsets.

    ``folder`` holds the arrays as ``.npy`` files (mapped when first used in a process), or is
    None when they could not be written: then they live in this object, and are pickled with it.
    """

    def __init__(self, folder: str | None, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
        self.folder = folder
        self.meta = meta
        self.n: int = meta["n"]
        self.n_shards: int = meta["n_shards"]
        self.fields: list[str] = meta["fields"]
        self.files: dict[str, np.memmap] = {}  # what is mapped (for tests and the curious)
        self._arrays = arrays
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The arrays an index holds."""
        per_field = [f"{what}.{k}" for k in range(len(self.fields)) for what in ("offsets", "sizes", "ends")]
        return ["starts", "path_offsets", "paths", "key_offsets", "keys", *per_field]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (mapped from the folder the first time it is asked for in an object)."""
        arrays = self._arrays
        if arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = self._map()
                arrays = self._arrays
        return arrays

    def _map(self) -> dict[str, np.ndarray]:
        files = {}
        try:
            for name in self.names():
                files[name] = _mapped(os.path.join(self.folder, f"{name}.npy"))
        except (OSError, ValueError) as e:
            raise DataError(
                f"{self.folder}: the tar index of these shards cannot be read ({e}); was the index cache "
                "removed while the data was in use? Open the source again to rebuild it"
            ) from e
        problem = _check_shapes(files, self.n, self.n_shards)
        if problem:
            raise DataError(f"{self.folder}: not a valid tar index ({problem}); open the source again to rebuild it")
        self.files = files
        # Plain ndarray views: indexing an np.memmap runs Python code of its subclass on every call.
        return {name: m.view(np.ndarray) for name, m in files.items()}

    def column(self, what: str, field: str) -> np.ndarray:
        """``offsets``, ``sizes`` or ``ends`` of ``field``."""
        return self.arrays()[f"{what}.{self.fields.index(field)}"]

    def key(self, i: int) -> str:
        """The key of record ``i``, decoded from the blob."""
        a = self.arrays()
        lo, hi = a["key_offsets"][i : i + 2].tolist()
        return a["keys"][lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def path(self, s: int) -> str:
        """The path of shard ``s`` (as it was given)."""
        a = self.arrays()
        lo, hi = a["path_offsets"][s : s + 2].tolist()
        return a["paths"][lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def paths(self) -> list[str]:
        """Every shard path, in order."""
        a = self.arrays()
        text, bounds = a["paths"].tobytes(), a["path_offsets"].tolist()
        return [text[lo:hi].decode("utf-8", "surrogateescape") for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def shard_of(self, idx: np.ndarray) -> np.ndarray:
        """The shard holding each record of ``idx``: the last shard starting at or before it
        (empty shards share their start with the next one, which comes later)."""
        return np.searchsorted(self.arrays()["starts"], idx, side="right") - 1

    def __getstate__(self) -> dict[str, Any]:
        arrays = None if self.folder is not None else self._arrays
        return {"folder": self.folder, "meta": self.meta, "arrays": arrays}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["meta"], state["arrays"])


def _check_shapes(arrays: dict[str, np.ndarray], n: int, n_shards: int) -> str | None:
    """What is wrong with the shapes and dtypes of an index's arrays, or None."""
    for name, arr in arrays.items():
        length = {"starts": n_shards + 1, "path_offsets": n_shards + 1, "key_offsets": n + 1}.get(name)
        if name in ("paths", "keys"):  # as long as the last of their offsets says
            length = int(arrays[f"{name[:-1]}_offsets"][-1])
        elif name.startswith(("offsets.", "sizes.")):
            length = n
        elif name.startswith("ends."):
            length = n_shards
        dtype = np.uint8 if name in ("paths", "keys") else np.int64
        if arr.dtype != dtype or arr.shape != (length,):
            return f"{name} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} ({length},)"
    return None


def open_tar_index(paths: Sequence[str], index_dir: str | None = None, progress: bool = False,
                   cached: CachedShards | None = None) -> TarIndex:
    """The combined index of shards ``paths``: mapped from the cache when it is there and matches
    every shard's size and modification time, else combined from the per-shard indexes (each
    cached or scanned by :func:`load_index`; a progress bar if ``progress``) and written to the cache.

    With ``cached`` (remote or compressed shards, see :func:`open_cached_index`), shards are
    known by URL and content identity instead.

    Where the cache cannot be written, a RuntimeWarning, and the index is kept in memory.
    """
    index_dir = index_dir or default_index_dir()
    if cached is not None:
        return open_cached_index(paths, cached, index_dir, progress)
    stats = [os.stat(p) for p in paths]
    # The file behind each path (device, inode: any spelling of the same path, no realpath walk), and its state.
    key = [INDEX_VERSION, [[p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] for p, st in zip(paths, stats, strict=True)]]
    digest = hashlib.sha256(json.dumps(key).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    folder = os.path.join(index_dir, SET_PREFIX + digest)
    sizes = np.fromiter((st.st_size for st in stats), dtype=np.int64, count=len(stats))
    found = _open_set(folder, sizes)
    if found is not None:
        return found
    bar = _progress(len(paths), "indexing shards", progress and len(paths) > 1, unit="shard")
    try:
        meta, arrays = _combine(paths, index_dir, bar)
    finally:
        bar.close()
    return _store_set(folder, meta, arrays, sizes, paths, index_dir)


def _store_set(folder: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], sizes: np.ndarray,
               paths: Sequence[str], index_dir: str) -> TarIndex:
    """Write a combined index and map it back (kept in memory, with a warning, where it cannot be written)."""
    try:
        _write_set(folder, meta, arrays)
    except OSError as e:
        warnings.warn(
            f"{paths[0]}: the combined index of these {len(paths)} shards could not be cached in {index_dir} ({e}); "
            "it is kept in memory, so every worker process gets a copy of its own (set TANDEM_CACHE_DIR to a "
            "writable folder to share one)", RuntimeWarning, stacklevel=4)
        return TarIndex(None, meta, arrays)
    found = _open_set(folder, sizes)
    return found if found is not None else TarIndex(None, meta, arrays)


def _open_set(folder: str, sizes: np.ndarray) -> TarIndex | None:
    """The combined index in ``folder`` if there is a valid one for shards of ``sizes`` bytes; else None."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != INDEX_VERSION or meta.get("n_shards") != len(sizes):
            return None
        ix = TarIndex(folder, meta)
        arrays = ix.arrays()
    except (OSError, ValueError, KeyError, TypeError, DataError):  # absent, torn or foreign: build it again
        return None
    ends = [arrays[f"ends.{k}"] for k in range(len(ix.fields))]
    if any((e > sizes).any() for e in ends) or arrays["starts"][-1] != ix.n:
        return None
    return ix


def _combine(paths: Sequence[str], index_dir: str, bar: Any,
             load: Callable[[int, str], dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The combined index's metadata and arrays, from each shard's own index (``load(s, path)``,
    by default :func:`load_index`)."""
    fields: dict[str, int] = {}
    shards = []
    for s, path in enumerate(paths):
        ix = load(s, path) if load is not None else load_index(path, index_dir)[0]
        blob, lengths = _utf8(ix["keys"])
        cols = {fields.setdefault(f, len(fields)): c for c, f in enumerate(ix["fields"])}
        shards.append((len(lengths), blob, lengths, cols, ix["offsets"], ix["sizes"]))
        bar.update(1)
    counts = np.array([s[0] for s in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(starts[-1])
    path_blob, path_lengths = _utf8(paths)
    arrays = {
        "starts": starts,
        "path_offsets": _bounds(path_lengths),
        "paths": np.frombuffer(path_blob, dtype=np.uint8),
        "key_offsets": _bounds(np.concatenate([np.zeros(0, np.int64), *[s[2] for s in shards]])),
        "keys": np.frombuffer(b"".join(s[1] for s in shards), dtype=np.uint8),
    }
    holes = []
    for k in range(len(fields)):
        offsets = np.full(n, -1, dtype=np.int64)
        sizes = np.full(n, -1, dtype=np.int64)
        ends = np.zeros(len(paths), dtype=np.int64)
        for s, (count, _, _, cols, off, siz) in enumerate(shards):
            c = cols.get(k)
            if c is None or not count:
                continue
            a = int(starts[s])
            offsets[a : a + count], sizes[a : a + count] = off[:, c], siz[:, c]
            there = off[:, c] >= 0
            if there.any():
                ends[s] = int((off[there, c] + siz[there, c]).max())
        missing = offsets < 0
        count = int(missing.sum())
        holes.append([count, int(missing.argmax()) if count else -1])
        arrays.update({f"offsets.{k}": offsets, f"sizes.{k}": sizes, f"ends.{k}": ends})
    meta = {"version": INDEX_VERSION, "n": n, "n_shards": len(paths), "fields": list(fields), "holes": holes}
    return meta, arrays


# --------------------------------------------------------------------------- tar: remote and compressed shards
URL_PREFIX = "url-"  # per-shard indexes of cached shards: <index_dir>/url-<digest>.npz


def open_cached_index(paths: Sequence[str], cached: CachedShards, index_dir: str, progress: bool = False) -> TarIndex:
    """The combined index of shards some of which are remote or compressed (``cached``).

    Each cached shard is known by its URL (or path) and what identifies its content without
    reading it (a checksum given, else the server's ETag and size: one ``HEAD`` each, no
    download); local tars as :func:`open_tar_index` knows them. The combined index, and each
    cached shard's own index, are kept under digests of those: a later run, or a shard
    evicted from the shard cache and fetched again, needs no download and no scan.

    Shards with no index yet are downloaded into the shard cache and scanned one by one, the
    next ones fetched in the background while one is scanned and the least recently used
    evicted as the cache's limit says, so data larger than the cache can be indexed.
    """
    ids = cached.identities()
    stats = [None if c else os.stat(p) for p, c in zip(paths, cached.cached, strict=True)]
    entries = [[p, i] if st is None else [p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
               for p, i, st in zip(paths, ids, stats, strict=True)]
    digest = hashlib.sha256(json.dumps([INDEX_VERSION, "cached", entries]).encode("utf-8", "surrogateescape"))
    folder = os.path.join(index_dir, SET_PREFIX + digest.hexdigest()[:32])
    # Known sizes bound the members' ends; a decompressed or unsized shard is checked when it is mapped.
    big = np.iinfo(np.int64).max
    sizes = np.array([st.st_size if st is not None else (cached.sizes[s] if cached.sizes[s] is not None else big)
                      for s, st in enumerate(stats)], dtype=np.int64)
    files = [_url_index_file(index_dir, p, i) if c else None for p, i, c in zip(paths, ids, cached.cached, strict=True)]
    found = _open_set(folder, sizes)
    if found is None:
        known = {s: ix for s, f in enumerate(files) if f is not None and (ix := _read_url_index(f, paths[s], ids[s]))}
        digests = [known[s].pop("digest") if s in known else None for s in range(len(paths))]
        missing = [s for s, f in enumerate(files) if f is not None and s not in known]
        rank = {s: k for k, s in enumerate(missing)}

        def load(s: int, path: str) -> dict[str, Any]:
            if files[s] is None:
                return load_index(path, index_dir)[0]
            if s in known:
                return known.pop(s)
            cached.want(missing[rank[s]:])  # this one, and the next that fit, in the background
            for attempt in range(3):
                local = cached.local(s)
                try:
                    ix = scan_tar(local)
                    digests[s], size = file_digest(local), os.path.getsize(local)
                    break
                except FileNotFoundError:  # evicted by another process sharing the cache: fetch it again
                    if attempt == 2:
                        raise DataError(f"{path}: evicted from {cached.cache_dir} by other processes each time it "
                                        f"was fetched; the processes sharing it need a larger cache_limit") from None
                except DataError as e:  # name the URL, not the cache's file; the copy goes (the next run fetches again)
                    with contextlib.suppress(OSError):
                        os.remove(local)
                    raise DataError(str(e).replace(local, f"{path} (cached as {local}, now deleted)", 1)) from None
            _write_url_index(files[s], path, ids[s], size, digests[s], ix)
            return ix

        bar = _progress(len(paths), "indexing shards", progress and len(paths) > 1, unit="shard")
        try:
            with cached.download_bar(missing):
                meta, arrays = _combine(paths, index_dir, bar, load)
        finally:
            bar.close()
        meta["digests"] = digests  # what describe() needs of each cached shard, with no download
        found = _store_set(folder, meta, arrays, sizes, paths, index_dir)
    ends = np.max([found.column("ends", f) for f in found.fields], axis=0) if found.fields else np.zeros(len(paths))
    for s in range(len(paths)):
        if cached.cached[s] and cached.sizes[s] is None:
            cached.sizes[s] = int(ends[s]) + 1024  # a decompressed shard: its members, and the end-of-archive blocks
    cached.indexed(found.meta["digests"], [*files, folder])
    return found


def _url_index_file(index_dir: str, url: str, identity: str) -> str:
    """Where the index of one cached shard is kept: under what names its content (see
    :func:`loaders._remote.cache_key`)."""
    key = json.dumps([INDEX_VERSION, cache_key(url, identity)]).encode("utf-8", "surrogateescape")
    return os.path.join(index_dir, URL_PREFIX + hashlib.sha256(key).hexdigest()[:32] + ".npz")


def _read_url_index(file: str, url: str, identity: str) -> dict[str, Any] | None:
    """The index cached for shard ``url`` of content ``identity``, if there is a valid one."""
    try:
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
    except Exception:  # absent, torn or foreign: scan the shard again
        return None
    if not isinstance(meta, dict) or [meta.get("version"), meta.get("key")] != [INDEX_VERSION, cache_key(url, identity)]:
        return None
    if not isinstance(meta.get("size"), int) or not isinstance(meta.get("digest"), str):
        return None
    ix = _read_index(file, meta)  # the arrays' shapes, dtypes and bounds
    if ix is not None:
        ix["digest"] = meta["digest"]
    return ix


def _write_url_index(file: str, url: str, identity: str, size: int, digest: str, ix: dict[str, Any]) -> None:
    meta = {"version": INDEX_VERSION, "url": url, "id": identity, "key": cache_key(url, identity), "size": size,
            "digest": digest}
    tmp = _tmp_name(file)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), keys=np.array(ix["keys"], dtype=str),
                     fields=np.array(ix["fields"], dtype=str), offsets=ix["offsets"], sizes=ix["sizes"])
        os.replace(tmp, file)
    except OSError:  # only time is lost: the combined index is what later runs read
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _utf8(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """``texts`` as one utf-8 blob, and the length in bytes of each."""
    blob = "".join(texts).encode("utf-8", "surrogateescape")
    if len(blob) != sum(map(len, texts)):  # not all ASCII: lengths in bytes differ from lengths in characters
        texts = [t.encode("utf-8", "surrogateescape") for t in texts]
    return blob, np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))


def _bounds(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _write_set(folder: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a combined index whole, then rename it into place; where another process got there
    first, keep theirs (the same content: the folder's name says what it indexes)."""
    tmp = _tmp_name(folder)
    try:
        os.makedirs(tmp)
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), arr, allow_pickle=False)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- HDF5: chunk tables
def h5_index_dir() -> str:
    """Where HDF5 chunk tables are cached: ``h5-index`` beside the tar indexes."""
    return os.path.join(os.path.dirname(default_index_dir()), "h5-index")


def chunk_table(path: str, dataset: str, count: int, compute: Callable[[], np.ndarray | None]) -> np.ndarray | None:
    """The chunk table of ``dataset`` in HDF5 file ``path`` (``count`` int64 entries), mapped from
    the cache when it is there for the file's current size and modification time; else
    ``compute()``, written to the cache and mapped (kept in memory where it cannot be written).
    None when ``compute()`` says the dataset cannot be read directly."""
    st = os.stat(path)
    key = json.dumps([INDEX_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, dataset])
    file = os.path.join(h5_index_dir(), hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".npy")
    with contextlib.suppress(OSError, ValueError):
        table = _mapped(file)
        if table.dtype == np.int64 and table.shape == (count,):
            return table
    table = compute()
    if table is None:
        return None
    tmp = _tmp_name(file)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        np.save(tmp, table, allow_pickle=False)
        os.replace(tmp + ".npy", file)
        return _mapped(file)
    except (OSError, ValueError):  # a read-only cache: the table stays in the source, as before
        with contextlib.suppress(OSError):
            os.remove(tmp + ".npy")
        return table
