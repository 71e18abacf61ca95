"""A small Hugging Face hub on 127.0.0.1 for the download tests.

It answers what ``huggingface_hub`` and ``dynamicrafter.hub`` ask about a model file:

- ``POST /api/models/{repo}/paths-info/{revision}`` (form field ``paths``): the file's size and LFS sha256;
- ``HEAD /{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag`` (the sha256) and
  ``X-Linked-Size``, as the real hub sends them;
- ``GET`` of the same URL: a redirect to ``/cdn/{sha256}``, like the hub's redirect to its CDN, which serves the
  bytes and honours ``Range: bytes=N-`` with a 206.

Switches: ``drop_after`` cuts the next transfer after that many body bytes (one time), ``corrupt`` flips a byte in
every transfer.  Every request is recorded in ``requests``.  Point ``HF_ENDPOINT`` at :attr:`LocalHub.url`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
PATHS_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<revision>[^/]+)$")


@dataclass(frozen=True)
class Seen:
    """One request the hub answered."""

    method: str
    path: str
    range: str | None
    sent: int = 0  # body bytes of a file sent back


@dataclass
class LocalHub:
    """The hub's state: its files, its switches, and what it saw."""

    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    drop_after: int | None = None
    corrupt: bool = False
    requests: list[Seen] = field(default_factory=list)
    url: str = ""

    def add(self, repo: str, filename: str, data: bytes) -> str:
        """Publish ``data`` as ``repo/filename``; returns its sha256."""
        self.files[(repo, filename)] = data
        return hashlib.sha256(data).hexdigest()

    def by_sha(self, sha: str) -> bytes | None:
        return next((d for d in self.files.values() if hashlib.sha256(d).hexdigest() == sha), None)

    def transfers(self) -> list[Seen]:
        """The requests that fetched file bytes."""
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/cdn/")]

    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length
    state: LocalHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _seen(self, sent: int = 0) -> None:
        self.state.requests.append(Seen(self.command, self.path, self.headers.get("Range"), sent))

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        headers = {"X-Error-Code": "EntryNotFound", "Content-Type": "application/json"}
        self._answer(404, headers, b'{"error":"not found"}')

    def do_POST(self) -> None:
        self._seen()
        length = int(self.headers.get("Content-Length", 0))
        form = parse_qs(self.rfile.read(length).decode())
        match = PATHS_INFO.match(self.path)
        if match is None:
            return self._not_found()
        out = []
        for path in form.get("paths", []):
            data = self.state.files.get((match["repo"], path))
            if data is not None:
                sha = hashlib.sha256(data).hexdigest()
                out.append({"type": "file", "path": path, "size": len(data), "oid": sha[:40],
                            "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}})
        self._answer(200, {"Content-Type": "application/json"}, json.dumps(out).encode())

    def do_HEAD(self) -> None:
        self._resolve()

    def do_GET(self) -> None:
        if self.path.startswith("/cdn/"):
            return self._blob(self.path[len("/cdn/"):])
        self._resolve()

    def _resolve(self) -> None:
        self._seen()
        match = RESOLVE.match(self.path)
        data = self.state.files.get((match["repo"], unquote(match["file"]))) if match else None
        if data is None:
            return self._not_found()
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
        else:
            self._answer(302, {**headers, "Location": f"/cdn/{sha}"})

    def _blob(self, sha: str) -> None:
        data = self.state.by_sha(sha)
        if data is None:
            self._seen()
            return self._not_found()
        start = 0
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if asked:
            start = int(asked[1])
        body = data[start:]
        if self.state.corrupt and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        cut = self.state.drop_after
        self.state.drop_after = None
        sent = len(body) if cut is None else min(cut, len(body))
        self._seen(sent)
        self.send_response(206 if asked else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(body[:sent])
        if sent < len(body):  # the connection drops half-way
            self.wfile.flush()
            self.close_connection = True
