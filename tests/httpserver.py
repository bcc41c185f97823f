"""A small Range-capable HTTP server on 127.0.0.1 for the remote-shard tests, with faults on request.

``Server(folder)`` serves the files of ``folder`` (GET and HEAD, ``Range: bytes=a-``/``a-b``,
``ETag`` and ``Content-Length``). Faults, per file name, in ``server.faults[name]``:
``{"status": [503, 429, ...]}`` answers those statuses first, one per request;
``{"drop_after": n}`` sends ``n`` bytes of the body and closes the connection (once);
``{"truncate": n}`` promises the whole length but sends ``n`` bytes (every time);
``{"ignore_range": True}`` always answers 200 with the whole file;
``{"throttle": n}`` sends the body ``n`` bytes at a time, 10 ms apart (so a test can act mid-transfer);
``{"etag": "..."}`` answers with that ETag instead of one derived from the content;
``{"etags": [...]}`` answers with these ETags, one per request (the last one from then on);
``{"no_etag": True}`` sends ``Last-Modified`` (the file's mtime) instead of an ETag, as
``python -m http.server`` does; ``{"no_validator": True}`` sends neither;
``{"no_length": True}`` sends no ``Content-Length`` (the body ends when the connection closes);
``{"delay": s}`` makes ``throttle`` wait ``s`` seconds between pieces instead of 10 ms.
``server.active`` is the number of GETs being answered now, ``server.peak`` its highest value.
``server.gets[name]`` counts GET requests, ``server.heads[name]`` HEAD requests,
``server.ranges[name]`` lists the ``Range`` header of each GET (None without one).
``server.kill()`` closes the listening socket and every open connection at once, as a
crashed server would; ``Server(folder, port=old.port)`` starts another on the same port.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import os
import socket
import threading
import time


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        self._counted = body
        try:
            self._answer(body)
        finally:
            self._done()

    def _done(self) -> None:
        if self._counted:
            self._counted = False
            with self.server.owner.lock:
                self.server.owner.active -= 1

    def _answer(self, body: bool) -> None:
        owner = self.server.owner
        name = self.path.lstrip("/").split("?")[0]
        path = os.path.join(owner.folder, name)
        with owner.lock:
            if body:
                owner.active += 1
                owner.peak = max(owner.peak, owner.active)
                owner.gets[name] += 1
                owner.ranges[name].append(self.headers.get("Range"))
            else:
                owner.heads[name] += 1
            fault = owner.faults.get(name, {})
            statuses = fault.get("status") or []
            status = statuses.pop(0) if statuses else None
        if status is not None:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not os.path.isfile(path):
            self.send_error(404, "Not Found")
            return
        with open(path, "rb") as f:
            data = f.read()
        with owner.lock:
            etags = fault.get("etags")
            changing = (etags.pop(0) if len(etags) > 1 else etags[0]) if etags else None
        etag = changing or fault.get("etag") or '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        partial = rng is not None and not fault.get("ignore_range")
        if partial:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start = int(a)
            end = int(b) if b else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        chunk = data[start : end + 1]
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if fault.get("no_length"):
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(chunk)))
        if fault.get("no_etag"):
            self.send_header("Last-Modified", self.date_time_string(int(os.path.getmtime(path))))
        elif not fault.get("no_validator"):
            self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        with owner.lock:
            drop = fault.pop("drop_after", None)
        cut = fault.get("truncate")
        if drop is not None or cut is not None:
            self.wfile.write(chunk[: drop if drop is not None else cut])
            self.wfile.flush()
            self.close_connection = True
            return
        step = fault.get("throttle")
        if step:
            for a in range(0, len(chunk), step):
                if a + step >= len(chunk):  # the client may ask again once it has this: not counted as active
                    self._done()
                self.wfile.write(chunk[a : a + step])
                self.wfile.flush()
                time.sleep(fault.get("delay", 0.01))
            return
        self.wfile.write(chunk)

    def setup(self) -> None:
        super().setup()
        with self.server.owner.lock:
            self.server.owner.connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.owner.lock:
            self.server.owner.connections.discard(self.connection)

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a killed connection
            super().handle()


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: Server


class Server:
    """Serve ``folder`` on 127.0.0.1 at :attr:`url` until :meth:`close`."""

    def __init__(self, folder: str, port: int = 0) -> None:
        self.folder = folder
        self.faults: dict[str, dict] = {}
        self.gets: collections.Counter = collections.Counter()
        self.heads: collections.Counter = collections.Counter()
        self.ranges: collections.defaultdict = collections.defaultdict(list)
        self.active = self.peak = 0
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def kill(self) -> None:
        """Stop at once: no new connections, and those open are cut mid-transfer."""
        self._httpd.shutdown()
        self._httpd.server_close()
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.kill()
