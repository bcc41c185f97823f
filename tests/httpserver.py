"""A small Range-capable HTTP server on 127.0.0.1 for the remote-shard tests, with faults on request.

``Server(folder)`` serves the files of ``folder`` (GET and HEAD, ``Range: bytes=a-``/``a-b``,
``ETag`` and ``Content-Length``). Faults, per file name, in ``server.faults[name]``:
``{"status": [503, 429, ...]}`` answers those statuses first, one per request;
``{"drop_after": n}`` sends ``n`` bytes of the body and closes the connection (once);
``{"truncate": n}`` promises the whole length but sends ``n`` bytes (every time);
``{"ignore_range": True}`` always answers 200 with the whole file.
``server.gets[name]`` counts GET requests.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import os
import threading


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
        owner = self.server.owner
        name = self.path.lstrip("/").split("?")[0]
        path = os.path.join(owner.folder, name)
        with owner.lock:
            if body:
                owner.gets[name] += 1
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
        etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
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
        self.send_header("Content-Length", str(len(chunk)))
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
        self.wfile.write(chunk)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: Server


class Server:
    """Serve ``folder`` on 127.0.0.1 at :attr:`url` until :meth:`close`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.faults: dict[str, dict] = {}
        self.gets: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
