"""Remote and compressed shards, fetched whole into one bounded local folder.

Tandem reads shards by random access (an index of member offsets and a memory map), so
a shard that lives on a server, or inside a gzip stream, is first made a plain local
file here; everything after that is the local path. :class:`ShardCache`:

- fetches ``http://`` / ``https://`` with the standard library, other protocols
  (``s3://``, ``gs://``, ...) through fsspec when it and the protocol's package are
  installed; ``.tar.gz`` / ``.tgz`` (remote or local) are decompressed once;
- writes to a temporary name and renames, so a file under its final name is complete;
- resumes a partial download (HTTP ``Range``) and retries with exponential backoff on
  429, 5xx, dropped connections, timeouts and short bodies; other HTTP errors (404)
  fail at once. After the retries, a :class:`DataError` names the URL and the cause;
- checks the size (the server's, or one given) and a checksum when one is known
  (``sha1=`` as in ATEK's URL lists, ``sha256=``); a file that fails is deleted, never used;
- lets the processes of a node share one folder: a file lock per shard, so a shard
  is fetched once however many processes ask for it;
- stays under ``limit`` bytes (plus the shard being fetched) by deleting the least
  recently used shards that are not pinned (the ones the next steps need).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import http.client
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from ._errors import DataError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
COMPRESSED = (".tar.gz", ".tgz")
CHUNK = 1 << 20
GUNZIP_LIMIT = 1 << 40  # bytes a compressed shard may expand to (a gzip bomb is an error, not a full disk)


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL this module fetches (``file://`` is local)."""
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def needs_cache(path: str) -> bool:
    """Whether ``path`` must be fetched or decompressed before it can be read at random."""
    return is_remote(path) or str(path).lower().endswith(COMPRESSED)


def default_cache_dir() -> str:
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(root, "shards")


class _Retry(Exception):
    """A failure worth another try (a dropped connection, a 5xx, a short body)."""


def _safe_name(url: str) -> str:
    """A local file name for ``url``: a digest of the whole URL plus its cleaned-up base name.

    Nothing of the URL becomes a path component: only ``[A-Za-z0-9._-]`` of its last part.
    """
    base = os.path.basename(urllib.parse.urlparse(url).path) or "shard"
    for ext in COMPRESSED:
        if base.lower().endswith(ext):
            base = base[: -len(ext)] + ".tar"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:].lstrip(".") or "shard"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


class ShardCache:
    """Remote and compressed shards as local files, in one folder of at most ``limit`` bytes.

    Args:
      cache_dir: the folder (default ``$TANDEM_CACHE_DIR/shards`` or ``~/.cache/tandem/shards``);
        processes of one node may share it.
      limit: bytes the folder may hold (None: no limit). Least recently used shards that
        are not pinned are deleted to stay under it; it may be exceeded by the shard
        being fetched, and by pinned shards.
      retries: further tries after a failure worth retrying (then a ``DataError``).
      backoff: seconds before the first retry, doubled each time (with jitter).
      timeout: seconds a connection may stay silent.
      workers: shards fetched at once by :meth:`prefetch`.
      progress: ``fn(url, bytes_done, bytes_total_or_None)``, called as bytes arrive.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        limit: int | None = None,
        *,
        retries: int = 6,
        backoff: float = 0.5,
        timeout: float = 60.0,
        workers: int = 4,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> None:
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.limit = None if limit is None else int(limit)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.progress = progress
        os.makedirs(os.path.join(self.cache_dir, ".locks"), exist_ok=True)
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="tandem-fetch")
        self._pending: dict[str, Future] = {}
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def local_path(self, url: str) -> str:
        """Where ``url`` is (or will be) kept in the cache."""
        return os.path.join(self.cache_dir, _safe_name(str(url)))

    def fetch(self, url: str, *, size: int | None = None, sha1: str | None = None, sha256: str | None = None) -> str:
        """The local path of ``url``, fetching (or decompressing) it first if it is not cached.

        Waits for a fetch :meth:`prefetch` started. Raises :class:`DataError` naming the
        URL when it cannot be had.
        """
        url = str(url)
        with self._lock:
            fut = self._pending.pop(url, None)
        if fut is not None:
            return fut.result()
        return self._fetch(url, size, sha1, sha256)

    def prefetch(self, urls: Iterable[str], *, checks: dict[str, dict] | None = None) -> None:
        """Start fetching ``urls`` in the background (at most ``workers`` at once).

        ``checks`` maps a URL to its ``size`` / ``sha1`` / ``sha256``. Errors surface in
        :meth:`fetch` of the same URL.
        """
        checks = checks or {}
        with self._lock:
            for url in urls:
                url = str(url)
                if url in self._pending or os.path.exists(self.local_path(url)):
                    continue
                self._pending[url] = self._pool.submit(self._fetch, url, **{"size": None, "sha1": None, "sha256": None,
                                                                               **checks.get(url, {})})

    def pin(self, urls: Iterable[str]) -> None:
        """Shards eviction must keep (the ones the next steps read); replaces the previous set."""
        with self._lock:
            self._pinned = {self.local_path(str(u)) for u in urls}

    def close(self) -> None:
        """Stop fetching (waits for the fetches under way)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return f"ShardCache({self.cache_dir!r}, limit={self.limit})"

    # ------------------------------------------------------------------ fetching
    def _fetch(self, url: str, size: int | None, sha1: str | None, sha256: str | None) -> str:
        dest = self.local_path(url)
        if os.path.exists(dest):
            _touch(dest)
            return dest
        lock_path = os.path.join(self.cache_dir, ".locks", os.path.basename(dest) + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process fetches; the others wait, then find the file
            if os.path.exists(dest):
                _touch(dest)
                return dest
            part = dest + ".part"
            if url.lower().endswith(COMPRESSED):
                raw = self._download(url, part + ".gz") if is_remote(url) else _local(url)
                _check(raw, url, size, sha1, sha256)
                _gunzip(raw, part, url)
                if raw != _local(url):
                    os.remove(raw)
            else:
                self._download(url, part)
                _check(part, url, size, sha1, sha256)
            os.replace(part, dest)
        self._evict(keep=dest)
        return dest

    def _download(self, url: str, part: str) -> str:
        """``url`` into ``part``, resuming what an earlier try (or run) left there; returns ``part``."""
        delay, last = self.backoff, None
        for attempt in range(self.retries + 1):
            try:
                if _SCHEME.match(url).group(1).lower() in ("http", "https"):
                    self._http(url, part)
                else:
                    self._fsspec(url, part)
                return part
            except _Retry as e:
                last = e
            if attempt < self.retries:
                time.sleep(delay * (1 + random.random() * 0.25))
                delay *= 2
        raise DataError(f"{url}: download failed after {self.retries + 1} tries ({last}); "
                        f"the partial file {part} is kept for the next run to resume")

    def _http(self, url: str, part: str) -> None:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": "tandem", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()  # its connection; the status and headers stay readable
            if e.code == 416 and have:  # nothing after what we have: complete if the server's length says so
                total = _content_range_total(e.headers.get("Content-Range"))
                if total == have:
                    return
                os.remove(part)
                raise _Retry(f"HTTP 416 with {have} bytes kept of {total}; starting over") from None
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code} {e.reason}") from None
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        with resp:
            if resp.status == 206:
                start = _content_range_start(resp.headers.get("Content-Range"))
                total = _content_range_total(resp.headers.get("Content-Range"))
                if start != have:
                    raise _Retry(f"the server resumed at byte {start}, not {have}")
            else:  # 200: the whole file (the server ignored Range)
                have, total = 0, _int(resp.headers.get("Content-Length"))
            self._copy(resp, part, have, total, url)

    def _fsspec(self, url: str, part: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise DataError(f"{url}: reading this protocol needs fsspec (pip install -e '.[remote]') "
                            "and the protocol's own package (s3fs, gcsfs, ...)") from None
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            fs, path = fsspec.core.url_to_fs(url)
            total = fs.size(path)
            with fs.open(path, "rb") as f:
                f.seek(have)
                self._copy(f, part, have, total, url)
        except FileNotFoundError:
            raise DataError(f"{url}: not found") from None
        except ImportError as e:
            raise DataError(f"{url}: this protocol needs a package that is not installed ({e})") from None
        except _Retry:
            raise
        except OSError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None

    def _copy(self, src: BinaryIO, part: str, have: int, total: int | None, url: str) -> None:
        done = have
        with open(part, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while True:
                try:
                    chunk = src.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # timeouts are OSErrors
                    raise _Retry(f"connection lost after {done} bytes ({type(e).__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if self.progress is not None:
                    self.progress(url, done, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and done != total:
            raise _Retry(f"short body: {done} of {total} bytes")

    # ------------------------------------------------------------------ eviction
    def _evict(self, keep: str) -> None:
        if self.limit is None:
            return
        with self._lock:
            pinned = self._pinned | {keep}
        entries = []
        with os.scandir(self.cache_dir) as it:
            for e in it:
                if e.is_file() and not e.name.startswith(".") and not e.name.endswith((".part", ".gz")):
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, e.path))
        used = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if used <= self.limit:
                break
            if path in pinned:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # a reader that has it mapped keeps its pages; the next one fetches again
                used -= size


def _touch(path: str) -> None:
    """Mark ``path`` recently used (eviction goes by modification time, shared by every process)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/", value or "")
    return int(m.group(1)) if m else None


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes [\d*-]+/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: str, url: str, size: int | None, sha1: str | None, sha256: str | None) -> None:
    """Raise (and delete ``path``) unless it has the expected size and checksums."""
    got = os.path.getsize(path)
    problem = None
    if size is not None and got != size:
        problem = f"{got} bytes, expected {size}"
    for name, want in (("sha1", sha1), ("sha256", sha256)):
        if problem is None and want:
            have = _digest(path, name)
            if have != want.lower():
                problem = f"{name} {have}, expected {want.lower()}"
    if problem is not None:
        if path != _local(url):
            os.remove(path)
        raise DataError(f"{url}: downloaded file does not match: {problem}; it was deleted, not used")


def _gunzip(src: str, dest: str, url: str) -> None:
    """Decompress ``src`` into ``dest`` (at most :data:`GUNZIP_LIMIT` bytes)."""
    done = 0
    try:
        with gzip.open(src, "rb") as f, open(dest, "wb") as out:
            for block in iter(lambda: f.read(CHUNK), b""):
                done += len(block)
                if done > GUNZIP_LIMIT:
                    raise DataError(f"{url}: decompresses to more than {GUNZIP_LIMIT} bytes; refusing it")
                out.write(block)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(dest)
        raise DataError(f"{url}: not a valid gzip file ({e})") from None
    except DataError:
        os.remove(dest)
        raise

