"""The tar format as WebDataset uses it: a header walk that groups members into samples,
and the per-shard index it yields, cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import threading
import warnings
from typing import Any

import numpy as np

from ._errors import DataError

INDEX_VERSION = 2  # 2: webdataset's name rule (``a.``, ``__meta__/``), tars without an end-of-archive marker
_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")


class TruncatedTarWarning(DataError, RuntimeWarning):
    """A tar whose members are complete but whose end-of-archive marker is missing: read as
    webdataset reads it, with this warning. Escalated to an error (``-W error``), it is a
    :class:`DataError`, as every other bad-input error."""


def default_index_dir() -> str:
    """Where tar indexes are cached: ``$TANDEM_CACHE_DIR/tar-index`` or ``~/.cache/tandem/tar-index``."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(root, "tar-index")


# --------------------------------------------------------------------------- tar headers
def _octal(field: bytes, path: str, where: int, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values: two's complement, sign in bit 0x40
        bits = 8 * len(field) - 1
        value = int.from_bytes(field, "big") & ((1 << bits) - 1)
        return value - (1 << bits) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text.strip(b"01234567"):  # octal digits only: int() would also take a sign, "0o" or "_"
        return int(text, 8) if text else 0
    raise DataError(f"{path}: bad tar header at byte {where}: {what} field {field!r} is not octal")


def _size(value: int, path: str, where: int) -> int:
    """``value`` if it is a valid size (>= 0): a negative one would walk the scan backwards."""
    if value < 0:
        raise DataError(f"{path}: bad tar header at byte {where}: size {value} is negative (expected a size >= 0)")
    return value


def _pax(data: bytes, path: str, where: int) -> dict[str, str]:
    """The records ``"<length> <key>=<value>\\n"`` of a PAX extended header (at byte ``where``).

    Every length must cover its digits, space and newline and stay within ``data``; a ``size``
    must be decimal digits. Trailing NULs (padding some writers add) end the payload.
    """
    out, pos, end = {}, 0, len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else -1
        stop = pos + length
        if length <= len(digits) + 1 or stop > end or data[stop - 1] != 10 or data.find(b"=", space, stop) < 0:
            raise DataError(
                f"{path}: bad tar header at byte {where}: malformed PAX record {data[pos : pos + 24]!r} at byte "
                f"{where + _BLOCK + pos}: expected '<length> <key>=<value>\\n', its length counting the whole record "
                f"(more than its digits and space), within the {end}-byte extended header"
            )
        key, _, value = data[space + 1 : stop - 1].partition(b"=")
        if key == b"size" and not (value.isdigit() and len(value) <= 20):
            raise DataError(
                f"{path}: bad tar header at byte {where}: PAX size {value[:40].decode('utf-8', 'replace')!r} "
                "is not a size (expected decimal digits)"
            )
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = stop
    return out


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __name__ and __name__/... at the start
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def split_name(name: str) -> tuple[str, str] | None:
    """A member name as WebDataset splits it into ``(key, extension)``, or None for members it skips.

    webdataset's rule (``tariterators.base_plus_ext`` and the metadata filters of
    ``tar_file_iterator``), exactly, edge cases included (``dir/.x.txt`` is key ``dir/``): the
    key runs to the first dot of the last path component, the extension is the rest,
    lower-cased (``a.`` has the extension ``""``). Skipped: names without such a dot,
    ``__name__`` at the top level and everything under a top-level ``__name__/`` folder
    (``__meta__/info.json``). Names only ever become keys, never paths.
    """
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None
    m = _KEY_EXT.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


def scan_tar(path: str) -> dict[str, Any]:
    """Walk a tar file's headers (never its data) and group members into samples.

    Returns ``{"keys": [...], "fields": [...], "offsets": int64[N, F], "sizes": int64[N, F]}``
    with ``-1`` where a sample lacks a field. Handles ustar, GNU (long names,
    base-256 sizes) and PAX headers. Members are named as :func:`split_name` says.

    A sample's members must be consecutive, as webdataset groups them: a key whose members
    are apart is a :class:`DataError` (webdataset would yield several partial samples with the
    same key; Tandem refuses the shard rather than guess). A tar that ends after a complete
    member without the end-of-archive marker is read up to there, as webdataset reads it,
    with a :class:`TruncatedTarWarning` (when the shard is indexed; the index is then cached).
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
                if pos > 0 and long_name is None and not pax and not mm[pos:size].strip(b"\0"):  # as webdataset: read on
                    warnings.warn(
                        f"{path}: truncated tar: ends at byte {size} after its last complete member, without the "
                        f"end-of-archive marker; reading the {len(keys)} samples before it, as webdataset does "
                        "(if the file was cut short, later samples are missing)", TruncatedTarWarning, stacklevel=2)
                    break
                raise DataError(
                    f"{path}: truncated tar: ends at byte {size} inside a header at byte {pos}, "
                    "without the end-of-archive marker"
                )
            hdr = mm[pos : pos + _BLOCK]
            if hdr == _ZERO:
                break
            chk, total = _octal(hdr[148:156], path, pos, "checksum"), sum(hdr[:148]) + 256 + sum(hdr[156:])
            if chk != total:
                raise DataError(
                    f"{path}: not a tar file or corrupt header at byte {pos} "
                    f"(checksum mismatch: the header says {chk}, its bytes sum to {total})"
                )
            kind = hdr[156:157]
            msize = _size(_octal(hdr[124:136], path, pos, "size"), path, pos)
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
            f"{path}: member {name!r} belongs to sample {key!r}, whose other members came earlier; a sample's members "
            "must be consecutive (webdataset would read them as separate, partial samples with the same key). "
            "Write the shard with its members sorted by name (tar --sort=name, or webdataset's TarWriter)"
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

    A cached index is used only when the shard's size and mtime match those recorded and its
    arrays are consistent; otherwise (stale, truncated, garbage) it is rebuilt and written back
    atomically.
    """
    index_dir = index_dir or default_index_dir()
    st = os.stat(path)
    file = _index_file(path, index_dir)
    how = "rebuilt" if os.path.exists(file) else "built"
    meta = {"version": INDEX_VERSION, "path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if how == "rebuilt" and not rebuild:
        cached = _read_index(file, meta)
        if cached is not None:
            return cached, "cached"
    index = scan_tar(path)
    tmp = f"{file}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(index_dir, exist_ok=True)
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
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        # The cache only saves time: a full disk or a read-only cache folder must not stop reading.
        warnings.warn(f"{path}: its index could not be cached in {index_dir} ({e}); "
                      "it is used from memory and will be built again next time (set TANDEM_CACHE_DIR "
                      "to a writable folder)", RuntimeWarning, stacklevel=2)
    return index, how


def _read_index(file: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The index cached in ``file`` if it is readable, describes the shard of ``meta`` and its
    arrays agree (shapes, dtypes, members within the shard); else None: it is to be rebuilt."""
    try:  # our own open: np.load leaks the file it opened when the zip in it is unreadable
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as z:
            if json.loads(str(z["meta"][()])) != meta:
                return None
            keys, fields, offsets, sizes = z["keys"], z["fields"], z["offsets"], z["sizes"]
    except Exception:  # a torn or foreign file: np.load, zipfile, zlib and json raise many kinds
        return None
    if keys.ndim != 1 or fields.ndim != 1 or keys.dtype.kind != "U" or fields.dtype.kind != "U":
        return None
    shape = (len(keys), len(fields))
    if (
        offsets.shape != shape or sizes.shape != shape or offsets.dtype != np.int64 or sizes.dtype != np.int64
        or not np.array_equal(offsets < 0, sizes < 0) or (offsets < -1).any() or (sizes < -1).any()
        or (offsets > meta["size"] - sizes).any()  # written so that no sum can overflow
    ):
        return None
    return {"keys": keys.tolist(), "fields": fields.tolist(), "offsets": offsets, "sizes": sizes}
