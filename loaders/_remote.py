"""Remote and compressed shards, fetched whole into one bounded local folder.

Tandem reads shards by random access (an index of member offsets and a memory map), so
a shard that lives on a server, or inside a gzip stream, is first made a plain local
file here; everything after that is the local path. :class:`ShardCache`:

- fetches ``http://`` / ``https://`` with the standard library, other protocols
  (``s3://``, ``gs://``, ...) through fsspec when it and the protocol's package are
  installed; ``.tar.gz`` / ``.tgz`` (remote or local) are decompressed once;
- writes to a temporary name and renames, so a file under its final name is complete;
- resumes a partial download (HTTP ``Range``, with ``If-Range`` and a check of the ETag, or
  of ``Last-Modified`` where the server sends no ETag, so a file that changed on the server
  is fetched again, not spliced; with neither, a partial file is started over) and retries
  with exponential backoff on 429, 5xx, dropped connections, timeouts, stalled transfers
  (below ``min_rate``) and short bodies; other HTTP errors (404) fail at once. After the
  retries, a :class:`DataError` names the URL;
- checks the size (the server's, or one given) and a checksum when one is known
  (``sha1=`` as in ATEK's URL lists, ``sha256=``); a file that fails is deleted, never used.
  A body sent with no length must end as a tar archive does (two zero blocks), or it is
  taken for one cut short;
- lets the processes of a node share one folder: a file lock per shard, so a shard
  is fetched once however many processes ask for it;
- stays under ``limit`` bytes (plus the one shard a reader needs now) by deleting the
  least recently used shards that are not pinned (the ones the next steps need):
  background fetches start only when they fit.

:class:`CachedShards` is one source's view of it: the shard names as given, what is known
of each (size, ETag, checksums), and a cache opened lazily in each process that reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import http.client
import os
import queue
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ._errors import DataError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
COMPRESSED = (".tar.gz", ".tgz")
CHUNK = 1 << 20
GUNZIP_LIMIT = 1 << 40  # bytes a compressed shard may expand to (a gzip bomb is an error, not a full disk)
_SHARD_FILE = re.compile(r"^[0-9a-f]{16}-[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar$")  # what _safe_name makes


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL this module fetches (``file://`` is local)."""
    m = _SCHEME.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def needs_cache(path: str) -> bool:
    """Whether ``path`` must be fetched or decompressed before it can be read at random."""
    return is_remote(path) or str(path).lower().endswith(COMPRESSED)


def default_cache_dir() -> str:
    """Where shards are cached: ``$TANDEM_CACHE_DIR/shards`` or ``~/.cache/tandem/shards``."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return os.path.join(root, "shards")


class RemoteInfo(NamedTuple):
    """What a server says of a file without sending it: its size and ETag (either may be None)."""

    size: int | None
    etag: str | None


_LAST_MODIFIED = "Last-Modified "
PIN_CAP = 64  # shards one process pins in every process's eyes (one open file each): the next ones it reads

_LOCKED: set[Any] = set()  # open files that hold (or wait for) a file lock
_LOCKED_GUARD = threading.Lock()


def _close_inherited() -> None:
    """In a forked child: close the copies of the parent's lock files. A file lock lasts while
    any copy of its open file does, so a child (a DataLoader worker) would otherwise hold the
    parent's locks, a download's or the eviction lock, for as long as it lives."""
    global _LOCKED_GUARD
    for f in list(_LOCKED):
        with contextlib.suppress(OSError):
            f.close()
    _LOCKED.clear()
    _LOCKED_GUARD = threading.Lock()  # another thread of the parent may have held it


os.register_at_fork(after_in_child=_close_inherited)


def _open_lock(path: str, mode: str) -> Any:
    """``open(path, mode)``, registered to be closed in a forked child; close with :func:`_close_lock`."""
    f = open(path, mode)  # noqa: SIM115
    with _LOCKED_GUARD:
        _LOCKED.add(f)
    return f


def _close_lock(f: Any) -> None:
    with _LOCKED_GUARD:
        _LOCKED.discard(f)
    f.close()


@contextlib.contextmanager
def _lock_file(path: str, mode: str):
    f = _open_lock(path, mode)
    try:
        yield f
    finally:
        _close_lock(f)


def _validator(headers: Any) -> str | None:
    """What names the version of the file a server sends: its ETag, else its ``Last-Modified``
    date (prefixed, so the two are told apart); None when it sends neither."""
    etag = headers.get("ETag")
    if etag:
        return etag
    modified = headers.get("Last-Modified")
    return _LAST_MODIFIED + modified if modified else None


def _bare(validator: str) -> str:
    """``validator`` as a server writes it (what ``If-Range`` takes)."""
    return validator.removeprefix(_LAST_MODIFIED)


def _label(validator: str) -> str:
    return validator if validator.startswith(_LAST_MODIFIED) else f"ETag {validator}"


def cache_key(url: str, version: str | None) -> str:
    """What a cached shard (and its index) is kept under: its checksum where one is known (so a
    signed URL whose token changes each run is still the same file), else the URL and
    ``version`` (an ETag, a modification time)."""
    if version and version.startswith(("sha256:", "sha1:")):
        return version
    return url if version is None else f"{url}\0{version}"


class _Retry(Exception):
    """A failure worth another try (a dropped connection, a 5xx, a short body)."""


def _safe_name(url: str, version: str | None = None) -> str:
    """A local file name for ``url``: a digest of the whole URL (and ``version``) plus its
    cleaned-up base name.

    Nothing of the URL becomes a path component: only ``[A-Za-z0-9._-]`` of its last part,
    never starting with a dot, always ending in ``.tar``.
    """
    base = os.path.basename(urllib.parse.urlparse(url).path) or "shard"
    for ext in COMPRESSED:
        if base.lower().endswith(ext):
            base = base[: -len(ext)] + ".tar"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:].lstrip(".") or "shard"
    if not base.endswith(".tar"):
        base += ".tar"
    key = cache_key(url, version)
    return f"{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}-{base}"


class _Workers:
    """Up to ``count`` daemon threads running submitted calls (``concurrent.futures`` style),
    started on demand and ended after ``idle`` seconds without work.

    Daemon threads, unlike ``ThreadPoolExecutor``'s, do not hold the interpreter at exit
    until every queued fetch has run: a download cut short leaves its ``.part`` file,
    which the next run resumes.
    """

    def __init__(self, count: int, name: str, idle: float = 30.0) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count, self._name, self._idle = count, name, idle
        self._live = self._busy = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                fut.cancel()
                return fut
            self._queue.put((fut, fn, args))
            if self._live - self._busy < self._queue.qsize() and self._live < self._count:
                self._live += 1
                t = threading.Thread(target=self._work, name=f"{self._name}-{self._live}", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
        return fut

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [f.result() for f in [self.submit(fn, x) for x in items]]

    def _work(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self._idle)
            except queue.Empty:
                job = None
            with self._lock:
                if job is None:
                    if self._queue.qsize() and not self._closed:
                        continue  # work came in as we gave up waiting
                    self._live -= 1
                    return
                self._busy += 1
            fut, fn, args = job
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:  # handed to whoever waits on the future
                        fut.set_exception(e)
            finally:
                with self._lock:
                    self._busy -= 1

    def shutdown(self, wait: bool = True) -> None:
        """Drop what is queued; wait for the calls under way if ``wait``."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
            for _ in threads:
                self._queue.put(None)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()


class ShardCache:
    """Remote and compressed shards as local files, in one folder of at most ``limit`` bytes.

    Args:
      cache_dir: the folder (default ``$TANDEM_CACHE_DIR/shards`` or ``~/.cache/tandem/shards``);
        processes of one node may share it.
      limit: bytes the folder may hold (None: no limit). Least recently used shards that
        are not pinned are deleted to stay under it. A shard a reader needs now is fetched
        even when it does not fit (so the folder may hold ``limit`` plus that shard);
        background fetches (:meth:`plan`) start only when they fit.
      retries: further tries after a failure worth retrying (then a ``DataError``).
      backoff: seconds before the first retry, doubled each time (with jitter).
      timeout: seconds a connection may stay silent; also the window over which ``min_rate``
        is measured, and (times the tries) how long to wait for another process's fetch of the
        same shard that makes no progress.
      min_rate: bytes per second a transfer must keep up, averaged over ``timeout`` seconds;
        a slower one is cut and retried (a server trickling bytes never times out).
      workers: shards fetched at once in the background.
      progress: ``fn(url, bytes_done, bytes_total_or_None)``, called as bytes arrive.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        limit: int | None = None,
        *,
        retries: int = 6,
        backoff: float = 0.5,
        timeout: float = 60.0,
        min_rate: float = 1024.0,
        workers: int = 4,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir or default_cache_dir()))
        self.limit = None if limit is None else int(limit)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.min_rate = float(min_rate)
        self.workers = max(1, int(workers))
        self.progress = progress
        self._pool = _Workers(self.workers, "tandem-fetch")
        self._pending: dict[str, Future] = {}
        self._pinned: set[str] = set()  # local paths
        self._pinned_urls: set[str] = set()
        self._pin_files: dict[str, Any] = {}  # local path -> open .pin file, share-locked while pinned
        self._pin_order: list[str] = []  # the pinned paths in the order they will be read
        self._reading: dict[int, str] = {}  # per thread, the shard fetch() was last asked for: pinned too
        self._plan: list[tuple[str, str, int]] = []  # plan()'s URLs in reading order: local path, bytes needed
        self._reserved: set[str] = set()  # URLs this process's fetches have made room for
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._pin_files)  # a cache dropped without close() lets go too

    # ------------------------------------------------------------------ public
    def local_path(self, url: str, version: str | None = None) -> str:
        """Where ``url`` is (or will be) kept in the cache. ``version``: what names its content
        (an ETag, a checksum), so another version of the same URL is another file."""
        return os.path.join(self.cache_dir, _safe_name(str(url), version))

    def fetch(self, url: str, *, size: int | None = None, sha1: str | None = None, sha256: str | None = None,
              etag: str | None = None, version: str | None = None) -> str:
        """The local path of ``url``, fetching (or decompressing) it first if it is not cached.

        Waits for a background fetch of the same URL. ``etag``: the ETag the shard had when
        it was indexed; a server answering with another one is an error (the file changed).
        ``version``: see :meth:`local_path`. Raises :class:`DataError` naming the URL when it
        cannot be had.
        """
        url = str(url)
        with self._lock:  # the shard read now is kept from every process's eviction until the next one
            alive = {t.ident for t in threading.enumerate()}  # a thread that ended pins nothing (each pin is a file)
            self._reading = {k: v for k, v in self._reading.items() if k in alive}
            self._reading[threading.get_ident()] = self.local_path(url, version)
            self._share_pins()
            fut = self._pending.get(url)
        if fut is not None:
            with self._lock:
                if self._pending.get(url) is fut:
                    del self._pending[url]
            try:  # one still queued is fetched here and now, not behind the other background fetches
                path = None if fut.cancel() else fut.result()  # its DataError, if it failed
            except CancelledError:
                path = None
            if path is not None and os.path.exists(path):
                return path
        return self._fetch(url, size, sha1, sha256, etag, version, background=False)

    def prefetch(self, urls: Iterable[str], *, checks: dict[str, dict] | None = None) -> None:
        """Start fetching ``urls`` in the background (at most ``workers`` at once), pinning them.

        ``checks`` maps a URL to its ``size`` / ``sha1`` / ``sha256`` / ``etag`` / ``version``.
        Errors surface in :meth:`fetch` of the same URL. :meth:`plan` is the bounded form.
        """
        urls, checks = [str(u) for u in urls], checks or {}
        with self._lock:
            self._pinned_urls |= set(urls)
            paths = [self.local_path(u, checks.get(u, {}).get("version")) for u in urls]
            self._pin_order += [p for p in paths if p not in self._pinned]
            self._pinned |= set(paths)
            self._share_pins()
        self._submit(urls, checks)

    def plan(self, urls: Sequence[str], *, sizes: dict[str, int] | None = None,
             checks: dict[str, dict] | None = None) -> list[str]:
        """The shards needed next, in the order they will be read: pin the longest prefix that
        fits in ``limit`` (the first one always), fetch those not cached in the background,
        and drop queued fetches of shards no longer wanted. Returns the pinned URLs.

        ``sizes`` (bytes a shard takes in the cache, where known) decide what fits.
        """
        sizes, checks = sizes or {}, checks or {}
        pinned, total = [], 0
        for u in dict.fromkeys(str(u) for u in urls):
            need = int(sizes.get(u) or 0)
            if self.limit is not None and pinned and total + need > self.limit:
                break
            pinned.append(u)
            total += need
        paths = [self.local_path(u, checks.get(u, {}).get("version")) for u in pinned]
        with self._lock:
            self._plan = [(u, path, int(sizes.get(u) or 0)) for u, path in zip(pinned, paths, strict=True)]
            self._pinned_urls = set(pinned)
            self._pinned, self._pin_order = set(paths), paths
            self._share_pins()
            stale = [fut for u, fut in self._pending.items() if u not in self._pinned_urls]
        for fut in stale:
            fut.cancel()  # if it has not started; its callback takes it off the queue
        for path in paths:  # recently used in every process's eyes: others evict them last
            _touch(path)
        self._submit(pinned, checks, sizes)
        return pinned

    def pin(self, urls: Iterable[str]) -> None:
        """Shards eviction must keep (the ones the next steps read); replaces the previous set."""
        urls = [str(u) for u in urls]
        with self._lock:
            self._pinned_urls = set(urls)
            self._pin_order = [self.local_path(u) for u in urls]
            self._pinned = set(self._pin_order)
            self._share_pins()

    def stat(self, url: str) -> RemoteInfo:
        """Size and ETag of ``url`` without downloading it (an HTTP ``HEAD``, fsspec's ``info``;
        a local compressed file: its size and modification time). Retried as downloads are."""
        url = str(url)
        if not is_remote(url):
            try:
                st = os.stat(_local(url))
            except OSError as e:
                raise DataError(f"{url}: cannot read it ({e.strerror})") from None
            return RemoteInfo(st.st_size, f"mtime:{st.st_mtime_ns}")
        scheme = _SCHEME.match(url).group(1).lower()
        return self._retrying(url, lambda: self._head(url) if scheme in ("http", "https") else self._fsspec_info(url),
                              "asking for its size")

    def stat_many(self, urls: Sequence[str]) -> list[RemoteInfo]:
        """:meth:`stat` of each of ``urls`` (``workers`` at once), in order."""
        if len(urls) <= 1:
            return [self.stat(u) for u in urls]
        return self._pool.map(self.stat, urls)

    def download(self, url: str, dest: str, *, size: int | None = None, sha1: str | None = None,
                 sha256: str | None = None, etag: str | None = None) -> str:
        """``url`` into the file ``dest`` (anywhere), as the cache fetches: through ``dest + ".part"``
        (resumed if an earlier run left one), checked, then renamed. Returns ``dest``."""
        if not is_remote(str(url)):
            raise DataError(f"{url}: not a URL to download (http://, https://, s3://, ...)")
        os.makedirs(os.path.dirname(os.path.abspath(dest)) or ".", exist_ok=True)
        self._get(str(url), dest, size, sha1, sha256, etag)
        return dest

    def close(self) -> None:
        """Stop fetching (drops queued fetches, waits for those under way) and let go of the pins."""
        self._pool.shutdown(wait=True)
        with self._lock:
            self._pinned, self._pinned_urls, self._pin_order, self._reading = set(), set(), [], {}
            self._share_pins()

    def __repr__(self) -> str:
        return f"ShardCache({self.cache_dir!r}, limit={self.limit})"

    # ------------------------------------------------------------------ fetching
    def _submit(self, urls: list[str], checks: dict[str, dict], sizes: dict[str, int] | None = None) -> None:
        started = []
        with self._lock:
            for url in urls:
                c = checks.get(url, {})
                if url in self._pending or os.path.exists(self.local_path(url, c.get("version"))):
                    continue
                fut = self._pool.submit(self._fetch, url, c.get("size"), c.get("sha1"), c.get("sha256"),
                                        c.get("etag"), c.get("version"), True, (sizes or {}).get(url))
                self._pending[url] = fut
                started.append((url, fut))
        for url, fut in started:  # outside the lock: a future already done calls back at once
            fut.add_done_callback(lambda f, u=url: self._forget(u, f))

    def _forget(self, url: str, fut: Future) -> None:
        """A background fetch that worked leaves the queue (one that failed stays, for fetch() to raise)."""
        if fut.cancelled() or fut.exception() is None:
            with self._lock:
                if self._pending.get(url) is fut:
                    del self._pending[url]

    def _fetch(self, url: str, size: int | None, sha1: str | None, sha256: str | None, etag: str | None,
               version: str | None, background: bool, room: int | None = None) -> str | None:
        """Fetch ``url`` into the cache unless it is there. ``size``: of the file fetched (checked);
        ``room``: bytes it will take in the cache (default ``size``, unknown for a compressed one)."""
        if room is None and not url.lower().endswith(COMPRESSED):
            room = size
        dest = self.local_path(url, version)
        if os.path.exists(dest):
            _touch(dest)
            return dest
        lock_path = self._lock_path(dest)
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)  # the folder may have been emptied under us
        with _lock_file(lock_path, "w") as lock:
            self._wait_for(lock, url, dest, lock_path)  # one process fetches; the others wait, then find the file
            if os.path.exists(dest):
                _touch(dest)
                return dest
            if background:
                with self._lock:
                    wanted = url in self._pinned_urls
                if not wanted:
                    return None  # the window moved on: a reader fetches it if it still needs it
            reserve = lock_path[: -len(".lock")] + ".reserve"
            with self._room_lock() if self.limit is not None else contextlib.nullcontext():
                fits = self._make_room(dest, int(room or 0) + (self._room_ahead(url) if background else 0))
                if background and not fits:
                    return None
                _write_text(reserve, str(int(room or 0)))  # what every process counts until the file is whole
                with self._lock:
                    self._reserved.add(url)
            try:
                self._get(url, dest, size, sha1, sha256, etag)
            finally:
                _remove_quietly(reserve)
                with self._lock:
                    self._reserved.discard(url)
        self._evict(keep=dest)
        return dest

    def _room_ahead(self, url: str) -> int:
        """Bytes the planned shards read before ``url`` still need: background fetches under way
        that have not made room yet. Counting them makes room go to shards in reading order,
        whichever worker asks first (called under :meth:`_room_lock`)."""
        with self._lock:
            ahead = 0
            for u, path, need in self._plan:
                if u == url:
                    return ahead
                if u in self._pending and u not in self._reserved and not os.path.exists(path):
                    ahead += need
            return 0  # not planned (prefetch()): nothing is known to come first

    def _lock_path(self, dest: str) -> str:
        return os.path.join(self.cache_dir, ".locks", os.path.basename(dest) + ".lock")

    def _wait_for(self, lock: Any, url: str, dest: str, lock_path: str) -> None:
        """Take the shard's lock, waiting while another process fetches it. Its download is
        watched: after ``timeout`` times the tries (and their backoff) without a byte more, the
        wait ends in a :class:`DataError` (a process stopped or hung while holding the lock)."""
        patience = self.timeout * (self.retries + 1) + self.backoff * 2 ** (self.retries + 1)
        seen, since, delay = -1, time.monotonic(), 0.005
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            grown = sum(_size(dest + ext) for ext in (".part", ".part.gz"))
            now = time.monotonic()
            if grown != seen:
                seen, since = grown, now
            elif now - since > patience:
                raise DataError(f"{url}: another process holds {lock_path} and its download has not grown for "
                                f"{now - since:.0f} s; stop that process (`fuser {lock_path}` names it)")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _get(self, url: str, dest: str, size: int | None, sha1: str | None, sha256: str | None,
             etag: str | None) -> None:
        """Download (or decompress) ``url`` into ``dest`` through a temporary name, checked."""
        part = dest + ".part"
        if url.lower().endswith(COMPRESSED):
            raw = self._download(url, part + ".gz", etag) if is_remote(url) else _local(url)
            _check(raw, url, size, sha1, sha256)
            try:
                _gunzip(raw, part, url)
            except DataError:
                if raw != _local(url):  # a download cut short with no length to tell: the next run starts over
                    _remove_quietly(raw)
                    _remove_quietly(self._etag_file(raw))
                raise
            if raw != _local(url):
                os.remove(raw)
                _remove_quietly(self._etag_file(raw))
        else:
            self._download(url, part, etag)
            try:
                _check(part, url, size, sha1, sha256)
            finally:
                _remove_quietly(self._etag_file(part))
        os.replace(part, dest)

    def _etag_file(self, part: str) -> str:
        """Where the ETag of a partial download is noted: beside it, or in the cache's ``.locks``
        (so the cache's folder holds only shards and downloads under way)."""
        folder, name = os.path.split(part)
        if folder == self.cache_dir:
            return os.path.join(folder, ".locks", name + ".etag")
        return part + ".etag"

    def _retrying(self, url: str, attempt: Callable[[], Any], doing: str, part: str | None = None) -> Any:
        delay, last = self.backoff, None
        for k in range(self.retries + 1):
            try:
                return attempt()
            except _Retry as e:
                last = e
            if k < self.retries:
                time.sleep(delay * (1 + random.random() * 0.25))
                delay *= 2
        kept = f"; the partial file {part} is kept for the next run to resume" if part and os.path.exists(part) else ""
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        raise DataError(f"{url}: {doing} failed after {tries} ({last}){kept}")

    def _download(self, url: str, part: str, etag: str | None = None) -> str:
        """``url`` into ``part``, resuming what an earlier try (or run) left there; returns ``part``."""
        http_ = _SCHEME.match(url).group(1).lower() in ("http", "https")
        self._retrying(url, lambda: self._http(url, part, etag) if http_ else self._fsspec(url, part), "download",
                       part)
        return part

    def _open(self, url: str, headers: dict[str, str], method: str = "GET"):
        """The server's answer to a request, or raises: ``_Retry`` for what is worth another try."""
        headers = {"User-Agent": "tandem", "Accept-Encoding": "identity", **headers}
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method),
                                          timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()  # its connection; the status and headers stay readable
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code} {e.reason}") from None
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    def _head(self, url: str) -> RemoteInfo:
        try:
            resp = self._open(url, {}, "HEAD")
        except urllib.error.HTTPError as e:
            if e.code not in (403, 405, 501):
                raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
            try:  # a server that refuses HEAD: ask for one byte instead
                resp = self._open(url, {"Range": "bytes=0-0"})
            except urllib.error.HTTPError as e2:
                raise DataError(f"{url}: HTTP {e2.code} {e2.reason}") from None
        with resp:
            etag = _validator(resp.headers)
            if resp.status == 206:
                return RemoteInfo(_content_range_total(resp.headers.get("Content-Range")), etag)
            size = _int(resp.headers.get("Content-Length"))
            return RemoteInfo(size if resp.getcode() == 200 else None, etag)

    def _http(self, url: str, part: str, etag: str | None) -> None:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        seen = _read_text(self._etag_file(part)) if have else None  # the ETag (or date) of the bytes we have
        if have and not seen:  # nothing says the bytes kept are of the version served now: start over
            os.remove(part)
            have = 0
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = _bare(seen)  # a server that knows it sends the whole new file if it changed
        try:
            resp = self._open(url, headers)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing after what we have: complete if the server's length says so
                total = _content_range_total(e.headers.get("Content-Range"))
                if total == have:
                    return
                os.remove(part)
                raise _Retry(f"HTTP 416 with {have} bytes kept of {total}; starting over") from None
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        with resp:
            got = _validator(resp.headers)
            if etag and got and got != etag:
                raise DataError(f"{url}: the file changed on the server since it was indexed ({_label(got)}, expected "
                                f"{_bare(etag)}); open the source again to index the new version")
            if resp.status == 206:
                start = _content_range_start(resp.headers.get("Content-Range"))
                total = _content_range_total(resp.headers.get("Content-Range"))
                if got != seen:  # our bytes are of another version (or nothing says they are not): start over
                    os.remove(part)
                    raise _Retry(f"the file changed on the server ({_label(got) if got else 'no ETag'}, was "
                                 f"{_bare(seen)}); starting over")
                if start != have:
                    raise _Retry(f"the server resumed at byte {start}, not {have}")
            else:  # 200: the whole file (the server ignored Range, or the file changed)
                have, total = 0, _int(resp.headers.get("Content-Length"))
                if got:
                    _write_text(self._etag_file(part), got)
                else:
                    _remove_quietly(self._etag_file(part))
            self._copy(resp, part, have, total, url, tar=not part.endswith(".gz"))

    def _fsspec_fs(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise DataError(f"{url}: reading this protocol needs fsspec (pip install fsspec) "
                            "and the protocol's own package (s3fs, gcsfs, ...)") from None
        try:
            return fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise DataError(f"{url}: this protocol needs a package that is not installed ({e})") from None

    def _fsspec_info(self, url: str) -> RemoteInfo:
        fs, path = self._fsspec_fs(url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise DataError(f"{url}: not found") from None
        except OSError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        etag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "md5", "mtime", "LastModified", "created")
                     if info.get(k) is not None), None)
        return RemoteInfo(_int(info.get("size")), etag)

    def _fsspec(self, url: str, part: str) -> None:
        fs, path = self._fsspec_fs(url)
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            total = fs.size(path)
            with fs.open(path, "rb") as f:
                f.seek(have)
                self._copy(f, part, have, total, url, tar=not part.endswith(".gz"))
        except FileNotFoundError:
            raise DataError(f"{url}: not found") from None
        except _Retry:
            raise
        except OSError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None

    def _copy(self, src: BinaryIO, part: str, have: int, total: int | None, url: str, tar: bool) -> None:
        """Append ``src`` to ``part`` (from byte ``have``). ``total``: the file's length, if the
        server said; else a ``tar`` must end with its end-of-archive blocks to count as whole."""
        done = have
        read = getattr(src, "read1", None) or src.read  # read1: what has arrived, so a cut transfer keeps it
        window, since = time.monotonic(), done  # the rate is measured over windows of ``timeout`` seconds
        with open(part, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while True:
                try:
                    chunk = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # timeouts are OSErrors
                    raise _Retry(f"connection lost after {done} bytes ({type(e).__name__})") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:  # a full disk: not worth retrying
                    raise DataError(f"{url}: writing {part} failed after {done} bytes ({e})") from None
                done += len(chunk)
                if self.progress is not None:
                    self.progress(url, done, total)
                now = time.monotonic()
                if now - window >= self.timeout:
                    if done - since < self.min_rate * (now - window):
                        out.flush()  # what came is kept for the next try to resume
                        raise _Retry(f"stalled: {done - since} bytes in the last {self.timeout:g} s, below "
                                     f"min_rate={self.min_rate:g} bytes/s")
                    window, since = now, done
            out.flush()
            os.fsync(out.fileno())
        if total is not None and done != total:
            raise _Retry(f"short body: {done} of {total} bytes")
        if total is None and tar and not _ends_as_tar(part):
            raise _Retry(f"the server sent no length and the file does not end as a tar archive does ({done} bytes)")

    # ------------------------------------------------------------------ eviction
    def _pin_path(self, path: str) -> str:
        return os.path.join(self.cache_dir, ".locks", os.path.basename(path) + ".pin")

    def _share_pins(self) -> None:
        """Make this process's pins seen by every process sharing the folder: a shared file lock
        on ``.locks/<shard>.pin`` per pinned shard (called under ``self._lock``; with a ``limit``)."""
        if self.limit is None:  # nothing is evicted by this process; processes sharing a folder share its limit
            return
        wanted = set(self._pin_order[:PIN_CAP]) | set(self._reading.values())  # a bounded number of open files
        for path in [p for p in self._pin_files if p not in wanted]:
            _close_lock(self._pin_files.pop(path))  # closing lets the lock go
        for path in wanted - self._pin_files.keys():
            pin = self._pin_path(path)
            try:
                os.makedirs(os.path.dirname(pin), exist_ok=True)
                f = _open_lock(pin, "a")  # held open while pinned
            except OSError:  # a pin is a courtesy to other processes; the folder's limit still holds
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_SH)
            except OSError:
                _close_lock(f)
                continue
            self._pin_files[path] = f

    def _remove_unpinned(self, path: str) -> bool:
        """Delete ``path`` unless a process pins it (holds its ``.pin`` lock); whether it went.
        A reader that has it mapped keeps its pages; the next one fetches it again."""
        pin = self._pin_path(path)
        try:
            f = _open_lock(pin, "rb")
        except FileNotFoundError:
            f = None
        try:
            if f is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # another process reads it, or will soon
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return True
        finally:
            if f is not None:
                _close_lock(f)

    @contextlib.contextmanager
    def _room_lock(self):
        """One eviction decision at a time on the node: a lock on ``.locks/.room`` (a file lock
        taken through a fresh open file, so it also keeps this process's threads apart)."""
        path = os.path.join(self.cache_dir, ".locks", ".room")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _lock_file(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """What the folder holds, as every process sharing it sees it: the evictable files
        ``(mtime, size, path)`` (whole shards, and partial downloads no process is making,
        left by one that was killed) and the bytes of the downloads under way, each counted
        at the larger of what it has written and what it reserved (its expected size)."""
        files, parts = [], {}
        with os.scandir(self.cache_dir) as it:
            for e in it:
                try:
                    if not e.is_file():
                        continue
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if _SHARD_FILE.match(e.name):
                    files.append((st.st_mtime, st.st_size, e.path))
                elif e.name.endswith((".part", ".part.gz")) and not e.name.startswith("."):
                    parts[e.path] = (st.st_mtime, st.st_size)
        busy = 0
        locks = os.path.join(self.cache_dir, ".locks")
        with contextlib.suppress(FileNotFoundError), os.scandir(locks) as it:
            for e in it:
                if not e.name.endswith(".reserve"):
                    continue
                dest = os.path.join(self.cache_dir, e.name[: -len(".reserve")])
                mine = {dest + ext: parts.pop(dest + ext)[1] for ext in (".part", ".part.gz") if dest + ext in parts}
                if _held(os.path.join(locks, e.name[: -len(".reserve")] + ".lock")):
                    busy += max(_int(_read_text(e.path)) or 0, sum(mine.values()))
                else:  # its process died: the reservation goes, its partial files may be evicted
                    _remove_quietly(e.path)
                    files += [(0.0, size, path) for path, size in mine.items()]
        for path, (mtime, size) in parts.items():
            lock = self._lock_path(path.removesuffix(".gz").removesuffix(".part"))
            if _held(lock):  # a fetch between taking its lock and reserving: not ours to delete
                busy += size
            else:
                files.append((mtime, size, path))
        return files, busy

    def _make_room(self, dest: str, size: int | None) -> bool:
        """Evict until the folder, the fetches under way in every process and ``size`` more bytes
        fit in the limit (called under :meth:`_room_lock`)."""
        if self.limit is None:
            return True
        return self._shrink(self.limit - int(size or 0), keep={dest})

    def _evict(self, keep: str) -> None:
        if self.limit is not None:
            with self._room_lock():
                self._shrink(self.limit, keep={keep})

    def _shrink(self, budget: int, keep: set[str]) -> bool:
        with self._lock:
            pinned = self._pinned | keep | set(self._reading.values())
        files, busy = self._scan()
        used = sum(size for _, size, _ in files) + busy
        for _, size, path in sorted(files):
            if used <= budget:
                break
            if path in pinned or not self._remove_unpinned(path):
                continue
            if not path.endswith(".tar"):  # a partial download left by a killed process, and its ETag note
                _remove_quietly(self._etag_file(path))
            used -= size
        return used <= budget


class CachedShards:
    """One source's shards, as they reach the shard cache: the names as given (URLs, local
    ``.tgz``; local plain tars are passed through), what is known of each, and a
    :class:`ShardCache` opened lazily in each process (so this object pickles as its settings).

    Args:
      names: every shard of the source, in order.
      checks: ``{name: {"size": ..., "sha1": ..., "sha256": ...}}`` where known.
      cache_dir, limit: the cache's folder and bound (see :class:`ShardCache`).
      progress: a byte progress bar while shards are downloaded to be indexed.
      cache_kwargs: more :class:`ShardCache` arguments (``retries``, ``backoff``, ``timeout``, ``workers``).
    """

    def __init__(self, names: Sequence[str], checks: dict[str, dict] | None = None, cache_dir: str | None = None,
                 limit: int | None = None, *, progress: bool = False, **cache_kwargs: Any) -> None:
        self.names = [str(n) for n in names]
        self.cached = [needs_cache(n) for n in self.names]
        self.checks = {n: dict(c) for n, c in (checks or {}).items()}
        self.cache_dir = os.path.abspath(os.fspath(cache_dir or default_cache_dir()))
        self.limit = None if limit is None else int(limit)
        self.progress = bool(progress)
        self.cache_kwargs = cache_kwargs
        self.info: list[RemoteInfo | None] = [None] * len(self.names)
        self.ids: list[str | None] = [None] * len(self.names)  # what names each one's content (identities())
        self.sizes: list[int | None] = [None] * len(self.names)  # bytes each takes in the cache
        self.digests: list[str | None] | None = None  # each one's file_digest when it was indexed
        self._index_files: list[str | None] = []  # where its index lies (and, last, the combined index)
        self._cache: ShardCache | None = None
        self._pid: int | None = None
        self._bar: Any = None
        self._lock = threading.Lock()
        self._wanted: tuple[list[int], float] | None = None  # the last want(): shards, when
        self._span: Any = None
        self._span_pid: int | None = None
        self._span_retry = 0.0
        self._span_lock = threading.Lock()

    @property
    def cache(self) -> ShardCache:
        """This process's :class:`ShardCache` (made the first time it is needed in a process)."""
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    self._cache = ShardCache(self.cache_dir, self.limit, progress=self._progress, **self.cache_kwargs)
                    self._pid = pid
        return self._cache

    @property
    def total_bytes(self) -> int:
        """Bytes the cached shards take, as far as known."""
        return sum(s or 0 for s, c in zip(self.sizes, self.cached, strict=True) if c)

    def identities(self) -> list[str]:
        """Per shard, what identifies its content without reading it: the checksum given
        (``sha256:``/``sha1:``), else the server's ETag and size (``HEAD``, ``workers`` at
        once); a local compressed file: size and modification time; a local tar: ``""``."""
        ask = [s for s, n in enumerate(self.names) if self.cached[s] and self.info[s] is None
               and not (self.checks.get(n, {}).get("sha256") or self.checks.get(n, {}).get("sha1"))]
        for s, info in zip(ask, self.cache.stat_many([self.names[s] for s in ask]), strict=True):
            self.info[s] = info
        out = []
        for s, name in enumerate(self.names):
            c = self.checks.get(name, {})
            if not self.cached[s]:
                out.append("")
            elif c.get("sha256") or c.get("sha1"):
                algo = "sha256" if c.get("sha256") else "sha1"
                out.append(f"{algo}:{c[algo].lower()} size:{c.get('size')}")
            else:
                info = self.info[s]
                size = c.get("size") if c.get("size") is not None else info.size
                out.append(f"etag:{info.etag} size:{size}")
            if self.cached[s] and not name.lower().endswith(COMPRESSED):
                self.sizes[s] = self._expected_size(s)
        self.ids = out
        return out

    def _expected_size(self, s: int) -> int | None:
        c = self.checks.get(self.names[s], {})
        if c.get("size") is not None:
            return int(c["size"])
        return self.info[s].size if self.info[s] is not None else None

    def _checks(self, s: int) -> dict[str, Any]:
        name = self.names[s]
        c = self.checks.get(name, {})
        info = self.info[s]
        size = c.get("size") if c.get("size") is not None else (info.size if info is not None else None)
        etag = info.etag if info is not None and is_remote(name) else None
        return {"size": size, "sha1": c.get("sha1"), "sha256": c.get("sha256"), "etag": etag, "version": self.ids[s]}

    def indexed(self, digests: Sequence[str | None], files: Sequence[str | None]) -> None:
        """What the index says of the shards: the digest of each cached one's content (checked
        when it is fetched again), and the index files to drop if one turns out to have changed
        (``files[s]`` per shard, then the combined index's folder)."""
        self.digests, self._index_files = list(digests), list(files)

    def local(self, s: int) -> str:
        """A local path of shard ``s``: the file itself for a local tar, else its cached copy
        (fetched first, or waited for, if it is not there). A copy whose content is not the one
        indexed (a server that sends no ETag changed the file) is an error, and its index is
        dropped so that opening the source again indexes the new version."""
        name = self.names[s]
        if not self.cached[s]:
            return name
        want = self.digests[s] if self.digests is not None else None
        for _ in range(3):
            path = self.cache.fetch(name, **self._checks(s))
            if want is None:
                return path
            from ._guard import file_digest

            try:
                got = file_digest(path)
            except FileNotFoundError:  # evicted by another process sharing the cache, just now: again
                continue
            if got != want:
                _remove_quietly(path)
                for f in (self._index_files[s], self._index_files[-1]):
                    if f is not None:
                        shutil.rmtree(f, ignore_errors=True) if os.path.isdir(f) else _remove_quietly(f)
                c, info = self.checks.get(name, {}), self.info[s]
                blind = not (c.get("sha1") or c.get("sha256")) and (info is None or info.etag is None)
                why = "; the server sends no ETag or Last-Modified" if blind and is_remote(name) else ""
                raise DataError(f"{name}: the file changed on the server since it was indexed (its content "
                                f"differs{why}); open the source again to index the new version")
            return path
        raise DataError(f"{name}: evicted from {self.cache_dir} by other processes each time it was fetched; "
                        f"the processes sharing it need a larger cache_limit (now {self.limit} bytes)")

    def local_if_cached(self, s: int) -> str | None:
        """Where shard ``s`` lies in the cache, if it is there now (a local tar: its path)."""
        if not self.cached[s]:
            return self.names[s]
        path = self.cache.local_path(self.names[s], self.ids[s])
        return path if os.path.exists(path) else None

    def want(self, shards: Sequence[int]) -> list[int]:
        """Shards the next steps read, in order: the ones that fit in the cache are pinned and
        fetched in the background. Returns those."""
        todo = [int(s) for s in shards if self.cached[int(s)]]
        last, now = self._wanted, time.monotonic()
        if last is not None and now - last[1] < 1.0 and set(last[0]) == set(todo) and (
                self.limit is None or sum(self.sizes[s] or 0 for s in todo) <= self.limit):
            return todo  # the same shards, all fitting: nothing changes (the order matters only at the limit)
        self._wanted = (todo, now)
        names = [self.names[s] for s in todo]
        sizes = {self.names[s]: self.sizes[s] for s in todo if self.sizes[s] is not None}
        pinned = set(self.cache.plan(names, sizes=sizes, checks={self.names[s]: self._checks(s) for s in todo}))
        return [s for s in todo if self.names[s] in pinned]

    def content_digest(self, digests: Sequence[str | None]) -> str:
        """The digest :func:`files_digest` gives for the same files, with no download: from the
        digests of the cached shards taken when they were indexed (``digests[s]``; None for a
        local tar, whose digest is taken here). A local copy of the same data matches."""
        from ._guard import file_digest

        h = hashlib.sha256()
        for s, name in enumerate(self.names):
            d = digests[s] if self.cached[s] else None
            h.update((d or file_digest(name)).encode())
        return h.hexdigest()[:16]

    @property
    def settled(self) -> bool:
        """Whether every shard is local for good in this process (no ``limit``, all mapped as one span):
        then there is nothing left to fetch ahead."""
        return self._span_pid == os.getpid() and self._span is not None

    def span(self, ix: Any) -> Any:
        """Every shard mapped into one address range (see :mod:`loaders._span`), or None.

        Only where nothing is evicted (no ``limit``) and every shard is in the cache: cached
        shards otherwise come and go, and are mapped one by one as they are read. Tried again
        at most once a second until the shards are all there; made once per process.
        ``ix``: the source's index (whose members must lie within the files).
        """
        pid = os.getpid()
        if self._span_pid == pid:
            return self._span
        if self.limit is not None or time.monotonic() < self._span_retry:
            return None
        with self._span_lock:
            if self._span_pid == pid:
                return self._span
            paths = [self.local_if_cached(s) for s in range(len(self.names))]
            if any(p is None for p in paths):
                self._span_retry = time.monotonic() + 1.0
                return None
            from ._guard import watch
            from ._span import map_span

            span = map_span(paths)
            if span is not None:
                ends = np.max([ix.column("ends", f) for f in ix.fields], axis=0) if ix.fields else 0
                short = np.flatnonzero(span.sizes < ends)
                if len(short):
                    k = int(short[0])
                    raise DataError(f"{self.names[k]} (cached as {paths[k]}): the shard shrank since it was indexed "
                                    f"({int(span.sizes[k])} bytes, index needs {int(ends[k])})")
                for path, size in zip(paths, span.sizes.tolist(), strict=True):
                    watch(path, size)
            elif self._span_retry == 0.0:  # no span on this platform, or a failed map: try once more later
                self._span_retry = time.monotonic() + 1.0
                return None
            self._span, self._span_pid = span, pid
            return span

    def _progress(self, url: str, done: int, total: int | None) -> None:
        bar = self._bar
        if bar is not None:
            bar.update(max(0, done - bar.seen.get(url, 0)))
            bar.seen[url] = done

    @contextlib.contextmanager
    def download_bar(self, shards: Sequence[int]):
        """A byte progress bar for fetching ``shards`` (when ``progress`` was asked for)."""
        if not self.progress or not shards:
            yield
            return
        from tqdm import tqdm

        total = sum(self.sizes[s] or 0 for s in shards) or None
        bar = tqdm(total=total, desc="downloading shards", unit="B", unit_scale=True, unit_divisor=1024,
                   dynamic_ncols=True)
        bar.seen = {}
        self._bar = bar
        try:
            yield
        finally:
            self._bar = None
            bar.close()

    def close(self) -> None:
        """Stop this process's background fetches."""
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_cache=None, _pid=None, _bar=None, _lock=None, _wanted=None, _span=None, _span_pid=None,
                     _span_retry=0.0, _span_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._span_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedShards({sum(self.cached)} of {len(self.names)} shards, {self.cache_dir!r}, limit={self.limit})"


def shard_basename(name: str) -> str:
    """A shard's file name, the same for a URL (query left out), a local path and a compressed
    copy (``.tar.gz`` / ``.tgz`` read as ``.tar``)."""
    base = os.path.basename(urllib.parse.urlparse(name).path if is_remote(name) else _local(name))
    for ext in COMPRESSED:
        if base.lower().endswith(ext):
            return base[: -len(ext)] + ".tar"
    return base


def _close_all(files: dict[str, Any]) -> None:
    for f in list(files.values()):
        with contextlib.suppress(OSError):
            _close_lock(f)
    files.clear()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _held(lock_path: str) -> bool:
    """Whether some process (this one included) holds the file lock ``lock_path``."""
    try:
        with _lock_file(lock_path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _ends_as_tar(path: str) -> bool:
    """Whether ``path`` is a whole tar archive: its headers, walked from the first (seeking over
    the members' data), end where its two zero end-of-archive blocks begin, within the file.
    (Zero bytes at the end alone prove nothing: a member's data may be zeros where it was cut.)"""
    import tarfile

    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    try:
        with tarfile.open(path, "r:") as t:
            t.getmembers()
            end = t.offset  # just past the last member's data: where the end-of-archive blocks are
        if end + 1024 > size:
            return False
        with open(path, "rb") as f:
            f.seek(end)
            return not any(f.read(1024))
    except (tarfile.TarError, OSError):
        return False


def _touch(path: str) -> None:
    """Mark ``path`` recently used (eviction goes by modification time, shared by every process)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


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
    """Decompress ``src`` into ``dest`` (at most :data:`GUNZIP_LIMIT` bytes). A stream that is not
    gzip and a write that fails (a full disk) are told apart in the error."""
    done = 0
    try:
        with gzip.open(src, "rb") as f, open(dest, "wb") as out:
            while True:
                try:
                    block = f.read(CHUNK)
                except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
                    raise DataError(f"{url}: not a valid gzip file ({e})") from None
                if not block:
                    break
                done += len(block)
                if done > GUNZIP_LIMIT:
                    raise DataError(f"{url}: decompresses to more than {GUNZIP_LIMIT} bytes; refusing it")
                try:
                    out.write(block)
                except OSError as e:
                    raise DataError(f"{url}: decompressing into {dest} failed after {done - len(block)} bytes "
                                    f"({e})") from None
    except DataError:
        _remove_quietly(dest)
        raise
    except OSError as e:  # opening either file
        _remove_quietly(dest)
        raise DataError(f"{url}: cannot decompress into {dest} ({e})") from None
