"""WebDataset tar shards with random access through a cached member index."""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._bytes import ByteWindows
from ._errors import DataError
from ._progress import progress
from ._shards import expand_shards
from ._span import Span, map_span

INDEX_VERSION = 1
_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff", "gif")
_INT_EXTS = ("cls", "cls2", "index", "inx", "id")
_TEXT_EXTS = ("txt", "text", "transcript")
_MAX_OPEN = 128
_ONE_GATHER = 4096  # .npy members up to this size are read header and data in one gather


def default_index_dir() -> str:
    """Where tar indexes are cached: ``$TANDEM_CACHE_DIR/tar-index`` or ``~/.cache/tandem/tar-index``."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(root, "tar-index")


# --------------------------------------------------------------------------- tar headers
def _octal(field: bytes, path: str, where: int, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DataError(f"{path}: bad tar header at byte {where}: {what} field {field!r} is not octal") from None


def _pax(data: bytes, path: str, where: int) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise DataError(f"{path}: malformed PAX header at byte {where}") from None
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = path up to the first dot of the basename; ext = the rest (lower case)."""
    slash = name.rfind("/")
    base = name[slash + 1 :]
    dot = base.find(".")
    if dot <= 0 or dot == len(base) - 1:
        return None
    if base.startswith("__") and base.endswith("__"):
        return None
    return name[: slash + 1] + base[:dot], base[dot + 1 :].lower()


def scan_tar(path: str) -> dict[str, Any]:
    """Walk a tar file's headers (never its data) and group members into samples.

    Returns ``{"keys": [...], "fields": [...], "offsets": int64[N, F], "sizes": int64[N, F]}``
    with ``-1`` where a sample lacks a field. Handles ustar, GNU (long names,
    base-256 sizes) and PAX headers.
    """
    size = os.path.getsize(path)
    keys: list[str] = []
    fields: dict[str, int] = {}
    rows: list[dict[int, tuple[int, int]]] = []
    seen: dict[str, int] = {}
    if size == 0:
        raise DataError(f"{path}: empty file, not a tar archive")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos, long_name, pax = 0, None, {}
        while True:
            if pos + _BLOCK > size:
                raise DataError(
                    f"{path}: truncated tar: ends at byte {size} inside a header at byte {pos}, "
                    "without the end-of-archive marker"
                )
            hdr = mm[pos : pos + _BLOCK]
            if hdr == _ZERO:
                break
            chk = _octal(hdr[148:156], path, pos, "checksum")
            if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise DataError(f"{path}: not a tar file or corrupt header at byte {pos} (checksum mismatch)")
            kind = hdr[156:157]
            msize = _octal(hdr[124:136], path, pos, "size")
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:263] == b"ustar\x00" and hdr[345:500].strip(b"\0"):
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            name = name.decode("utf-8", "surrogateescape")
            data = pos + _BLOCK
            if kind in (b"x", b"g", b"L", b"K"):
                if data + msize > size:
                    raise DataError(f"{path}: truncated tar: extended header at byte {pos} runs past the end")
                payload = mm[data : data + msize]
                if kind == b"x":
                    pax = _pax(payload, path, pos)
                elif kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                if long_name is not None:
                    name = long_name
                if "path" in pax:
                    name = pax["path"]
                if "size" in pax:
                    msize = int(pax["size"])
                long_name, pax = None, {}
                if data + msize > size:
                    raise DataError(
                        f"{path}: truncated tar: member {name!r} needs {msize} bytes at byte {data}, "
                        f"the file ends at {size}"
                    )
                if kind in _REGULAR:
                    _add_member(path, name, data, msize, keys, fields, rows, seen)
                elif kind == b"S":
                    raise DataError(f"{path}: member {name!r} is a GNU sparse file, which shards cannot hold")
            pos = data + -(-msize // _BLOCK) * _BLOCK
    offsets = np.full((len(keys), len(fields)), -1, dtype=np.int64)
    sizes = np.full((len(keys), len(fields)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        for j, (o, s) in row.items():
            offsets[i, j], sizes[i, j] = o, s
    return {"keys": keys, "fields": list(fields), "offsets": offsets, "sizes": sizes}


def _add_member(path, name, offset, size, keys, fields, rows, seen) -> None:
    parts = split_name(name)
    if parts is None:
        return
    key, ext = parts
    j = fields.setdefault(ext, len(fields))
    if keys and keys[-1] == key:
        row = rows[-1]
        if j in row:
            raise DataError(f"{path}: duplicate member {name!r}: sample {key!r} already has a {ext!r} field")
        row[j] = (offset, size)
        return
    if key in seen:
        raise DataError(
            f"{path}: member {name!r} belongs to sample {key!r}, whose other members came earlier; "
            "a sample's members must be consecutive (duplicate key?)"
        )
    seen[key] = len(keys)
    keys.append(key)
    rows.append({j: (offset, size)})


# --------------------------------------------------------------------------- index cache
def _index_file(path: str, index_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    return os.path.join(index_dir, f"{digest}.npz")


def load_index(path: str, index_dir: str | None = None, *, rebuild: bool = False) -> tuple[dict[str, Any], str]:
    """The index of one shard and how it was obtained: ``"cached"``, ``"built"`` or ``"rebuilt"``.

    A cached index is used only when the shard's size and mtime match those recorded;
    otherwise (or when unreadable) it is rebuilt and written back atomically.
    """
    index_dir = index_dir or default_index_dir()
    st = os.stat(path)
    file = _index_file(path, index_dir)
    how = "rebuilt" if os.path.exists(file) else "built"
    if how == "rebuilt" and not rebuild:
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta == {"version": INDEX_VERSION, "path": os.path.realpath(path),
                            "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                    return {
                        "keys": z["keys"].tolist(),
                        "fields": z["fields"].tolist(),
                        "offsets": z["offsets"],
                        "sizes": z["sizes"],
                    }, "cached"
        except (OSError, ValueError, KeyError):
            pass
    index = scan_tar(path)
    meta = {"version": INDEX_VERSION, "path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    os.makedirs(index_dir, exist_ok=True)
    tmp = f"{file}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.array(json.dumps(meta)),
            keys=np.array(index["keys"], dtype=str),
            fields=np.array(index["fields"], dtype=str),
            offsets=index["offsets"],
            sizes=index["sizes"],
        )
    os.replace(tmp, file)
    return index, how


# --------------------------------------------------------------------------- decoding
class _NpyLayout:
    """A parsed ``.npy`` header: where the data starts and what it holds."""

    __slots__ = ("header", "header_words", "data_offset", "dtype", "shape", "fortran", "nbytes")

    def __init__(self, buf: bytes | memoryview, where: str) -> None:
        buf = bytes(buf)
        if buf[:6] != b"\x93NUMPY":
            raise DataError(f"{where}: not a valid .npy member (no NUMPY magic)")
        major = buf[6]
        if major == 1:
            hlen, start = int.from_bytes(buf[8:10], "little"), 10
        elif major in (2, 3):
            hlen, start = int.from_bytes(buf[8:12], "little"), 12
        else:
            raise DataError(f"{where}: not a valid .npy member (format version {major})")
        try:
            import ast

            from numpy.lib.format import descr_to_dtype

            d = ast.literal_eval(buf[start : start + hlen].decode("latin1"))
            self.dtype = descr_to_dtype(d["descr"])
            self.shape = tuple(d["shape"])
            self.fortran = bool(d["fortran_order"])
        except Exception as e:
            raise DataError(f"{where}: not a valid .npy member (bad header: {e})") from None
        if self.dtype.hasobject:
            raise DataError(f"{where}: .npy member holds Python objects (pickled); refusing to load it")
        self.data_offset = start + hlen
        self.header = buf[: self.data_offset]
        # compared with every member's header: as 8-byte words where the length allows (npy pads to 64)
        word = np.uint64 if self.data_offset % 8 == 0 else np.uint8
        self.header_words = np.frombuffer(self.header, dtype=word)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def array(self, buf, where: str) -> np.ndarray:
        if len(buf) != self.data_offset + self.nbytes:
            raise DataError(
                f"{where}: not a valid .npy member: {len(buf)} bytes, header says "
                f"{self.data_offset + self.nbytes} for {self.dtype} {self.shape}"
            )
        arr = np.frombuffer(buf, dtype=self.dtype, count=self.nbytes // max(1, self.dtype.itemsize),
                            offset=self.data_offset)
        order = "F" if self.fortran else "C"
        return arr.reshape(self.shape, order=order).copy()


def decode(ext: str, data: bytes, where: str, *, allow_pickle: bool = False) -> Any:
    """Decode one member by its last extension, as webdataset's default decoders do."""
    last = ext.rsplit(".", 1)[-1]
    if last == "npy":
        return _NpyLayout(data[:4096], where).array(data, where)
    if last in _INT_EXTS:
        try:
            return int(data)
        except ValueError:
            raise DataError(f"{where}: expected an integer, got {bytes(data[:40])!r}") from None
    if last in _TEXT_EXTS:
        return bytes(data).decode("utf-8")
    if last == "json":
        try:
            return json.loads(bytes(data))
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
    if last in _PICKLE_EXTS:
        if not allow_pickle:
            raise DataError(
                f"{where}: is a pickle; refusing to unpickle shard contents "
                "(pass allow_pickle=True only for data you trust)"
            )
        if last == "pth":
            import torch

            return torch.load(io.BytesIO(data), weights_only=False)
        import pickle

        return pickle.loads(data)
    if last in _IMAGE_EXTS:
        try:
            from PIL import Image
        except ImportError:
            return bytes(data)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im)
        except Exception as e:
            raise DataError(f"{where}: not a readable image ({e})") from None
    return bytes(data)


# --------------------------------------------------------------------------- the source
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
    """

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
        self._npy: dict[tuple[int, int], _NpyLayout] = {}
        self._plan = self._make_plan()

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
        names = "\n".join(os.path.basename(p) for p in self.shards)
        digest = hashlib.sha256(names.encode()).hexdigest()[:12]
        first, last = os.path.basename(self.shards[0]), os.path.basename(self.shards[-1])
        return (
            f"TarSource({len(self.shards)} shards {first}..{last} #{digest}, records={len(self)}, "
            f"fields={self.fields}, rename={self.rename})"
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
        out = {}
        rows = self._rows(idx) if len(idx) else None
        for j, name, how in self._plan:
            if how == "npy":
                out[name] = self._gather_npy(idx, j, rows)
            elif how == "int" and len(idx):
                out[name] = self._gather_int(idx, j, rows)
            else:
                out[name] = _stack([self._decode_one(int(i), j) for i in idx], name, self, idx, j)
        return out

    def _make_plan(self) -> list[tuple[int, str, str | None]]:
        """Per field: its column, its output name, and its batch decoder ("npy", "int" or None)."""
        plan = []
        for j, f in enumerate(self.fields):
            last = f.rsplit(".", 1)[-1]
            default = self.decode and f not in self.decoders and last not in self.decoders
            how = ("npy" if last == "npy" else "int" if last in _INT_EXTS else None) if default else None
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
                self._span, self._span_pid = span, pid
            return self._span

    def _rows(self, idx: np.ndarray) -> _BatchRows:
        """Where a batch's records lie: found once per batch, used by every field."""
        shards = self._shard_of[idx]
        span = self._all_shards()
        if span is not None:  # one gather per field, whatever the number of shards
            base = span.bases[shards]
            return _BatchRows([(span.windows, slice(None))], base, base + self._shard_end[shards])
        first = int(shards[0])
        if (shards == first).all():
            return _BatchRows([(self._map(first).windows, slice(None))], 0, int(self._shard_end[first]))
        order = np.argsort(shards, kind="stable")
        groups = [(self._map(int(shards[rows[0]])).windows, rows)
                  for rows in np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)]
        return _BatchRows(groups, 0, self._shard_end[shards])

    @staticmethod
    def _gather_bytes(rows: _BatchRows, offsets: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``width`` bytes at each offset (from ``rows.base``), as a ``[n, width]`` array, and
        which rows lay inside the indexed part of their shard (the others are zeros)."""
        ok = (offsets >= rows.base) & (offsets + width <= rows.limits)
        good = bool(ok.all())
        if not good:
            offsets = np.where(ok, offsets, 0)
        if len(rows.groups) == 1:
            out = _take(rows.groups[0][0], width, offsets)
        else:
            out = np.empty((len(offsets), width), dtype=np.uint8)
            for windows, which in rows.groups:
                out[which] = _take(windows, width, offsets[which])
        if not good:
            out[~ok] = 0
        return out, ok

    def _gather_int(self, idx: np.ndarray, j: int, rows: _BatchRows) -> np.ndarray:
        """Decode short decimal members (``.cls``) of a batch at once, straight from the shard maps.

        Members holding anything but digits (a sign, whitespace) take the per-record path.
        """
        sizes, offsets = self._sizes[idx, j], self._offsets[idx, j] + rows.base
        width = int(min(18, max(1, sizes.max())))
        chars, ok = self._gather_bytes(rows, offsets, width)
        digits = chars - np.uint8(48)  # anything but '0'..'9' wraps past 9
        if (sizes == width).all():  # the usual case: every member has as many digits
            slow = ~ok | (digits > 9).any(axis=1)
            out = digits @ (10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
        else:
            cols = np.arange(width)
            inside = cols < sizes[:, None]
            slow = ~ok | (sizes < 1) | (sizes > 18) | (inside & (digits > 9)).any(axis=1)
            place = np.where(inside, 10 ** np.clip(sizes[:, None] - 1 - cols, 0, 17), 0)
            out = (digits * place).sum(axis=1)
        for r in np.flatnonzero(slow):
            out[r] = self._decode_one(int(idx[r]), j)
        return out

    def _layout(self, shard: int, i: int, j: int) -> _NpyLayout:
        key = (shard, j)
        lay = self._npy.get(key)
        if lay is None:
            mm = self._map(shard).mm
            o = int(self._offsets[i, j])
            lay = _NpyLayout(mm[o : o + min(4096, int(self._sizes[i, j]))], self._where(i, j))
            self._npy[key] = lay
        return lay

    def _gather_npy(self, idx: np.ndarray, j: int, rows: _BatchRows) -> np.ndarray:
        """Copy the data of ``.npy`` members straight out of the shard maps.

        Every member's header is compared with the layout's, byte for byte; a member
        with another header (shape, dtype) takes the per-record path.
        """
        if len(idx) == 0:
            raise ValueError("empty batch")
        offsets, sizes = self._offsets[idx, j] + rows.base, self._sizes[idx, j]
        lay = self._layout(int(self._shard_of[idx[0]]), int(idx[0]), j)
        if lay.fortran:
            return _stack([self._decode_one(int(i), j) for i in idx], self.fields[j], self, idx, j)
        whole = lay.data_offset + lay.nbytes
        if whole <= _ONE_GATHER:  # small members: header and data in one gather
            both, ok = self._gather_bytes(rows, offsets, whole)
            heads, out = both[:, : lay.data_offset], np.ascontiguousarray(both[:, lay.data_offset :])
        else:
            heads, ok = self._gather_bytes(rows, offsets, lay.data_offset)
        same = ok & (sizes == whole) & (heads.view(lay.header_words.dtype) == lay.header_words).all(axis=1)
        if whole > _ONE_GATHER:
            out, inside = self._gather_bytes(rows, np.where(same, offsets + lay.data_offset, -1), lay.nbytes)
            same &= inside
        result = out.view(lay.dtype).reshape((len(idx), *lay.shape))
        for r in [] if same.all() else np.flatnonzero(~same):
            arr = self._decode_one(int(idx[r]), j)
            if arr.shape != lay.shape or arr.dtype != lay.dtype:
                first = f"{self._keys[int(idx[0])]}.{self.fields[j]}"
                raise DataError(
                    f"{self._where(int(idx[r]), j)}: holds {arr.dtype} {arr.shape}, but {first} in the same batch "
                    f"holds {lay.dtype} {lay.shape}; they cannot be stacked (use read_records or a collate function)"
                )
            result[r] = arr
        return result if lay.dtype.isnative else result.astype(lay.dtype.newbyteorder("="))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _open=OrderedDict(), _pid=None, _span=None, _span_pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _take(windows: ByteWindows, width: int, offsets: np.ndarray) -> np.ndarray:
    """Rows of ``width`` bytes at ``offsets``; zeros where the buffer is shorter than a row."""
    if len(windows.u8) < width:
        return np.zeros((len(offsets), width), dtype=np.uint8)
    return windows.get(width)[offsets]


class _BatchRows:
    """One batch's rows grouped by byte buffer (``(byte windows, rows)`` each: one group when all
    shards share one mapping), and per row where its shard starts and where its indexed part
    ends in that buffer (arrays, or one number for all)."""

    __slots__ = ("groups", "base", "limits")

    def __init__(self, groups: list[tuple[ByteWindows, Any]], base: np.ndarray | int, limits: np.ndarray | int) -> None:
        self.groups, self.base, self.limits = groups, base, limits


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


def _stack(values: list[Any], name: str, src: TarSource | None = None, idx=None, j: int = 0) -> Any:
    first = values[0] if values else None
    if isinstance(first, bool | int | float | np.number):
        return np.asarray(values)
    if isinstance(first, str):
        return np.asarray(values, dtype=str)
    if isinstance(first, np.ndarray):
        for k, v in enumerate(values):
            if not isinstance(v, np.ndarray) or v.shape != first.shape:
                where = src._where(int(idx[k]), j) if src is not None else f"record {k} of {name!r}"
                shape = getattr(v, "shape", type(v).__name__)
                raise DataError(
                    f"{where}: shape {shape} differs from {first.shape} of the batch's first record; "
                    "cannot stack (use read_records or a collate function)"
                )
        return np.stack(values)
    return values


def stack_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate records into a batch: numbers and equal-shaped arrays stack, strings form a
    string array, anything else a list (the default collate of :class:`loaders.Loader`)."""
    if not records:
        return {}
    return {k: _stack([r[k] for r in records], k) for k in records[0]}
