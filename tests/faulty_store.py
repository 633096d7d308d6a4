"""A store that fails on purpose: a threaded HTTP reverse proxy on loopback in front of the moto server.

It forwards every request unchanged, except GETs of chosen keys, which it answers with an S3
``503 SlowDown`` error or by resetting the connection, a chosen number of times (or forever) before
forwarding them again. Pointing ``AWS_ENDPOINT_URL`` at it gives s3fs the faults a real store
under load shows, with no mock of the client.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "expect", "te", "upgrade"})
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Fault:
    """Fail GETs whose key contains ``key_part``: ``times`` of them (-1: all), by ``kind``."""

    key_part: str
    times: int = -1
    kind: str = "slow-down"  # "slow-down" (HTTP 503) or "reset" (TCP RST before any response)
    failed: int = 0  # GETs failed so far


@dataclass
class FaultyStore:
    """The proxy's address and the faults it injects; change ``faults`` while it runs."""

    upstream: str  # the moto server, http://127.0.0.1:PORT
    faults: list[Fault] = field(default_factory=list)
    gets: dict[str, int] = field(default_factory=dict)  # key -> GETs seen
    endpoint: str = ""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FaultyStore:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue", which botocore sends with bodies

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                key = unquote(urlsplit(self.path).path)
                with store._lock:
                    store.gets[key] = store.gets.get(key, 0) + 1
                    fault = next((f for f in store.faults if f.key_part in key and f.times != 0), None)
                    if fault is not None:
                        fault.failed += 1
                        if fault.times > 0:
                            fault.times -= 1
                if fault is None:
                    self._forward()
                elif fault.kind == "reset":
                    # SO_LINGER 0: close() sends RST, as a dropped connection looks to the client.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                else:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    self.close_connection = True

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream = urlsplit(store.upstream)
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    content = response.read()
                finally:
                    connection.close()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)
                self.close_connection = True

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
