"""An HTTP proxy that sits between an S3 client and moto and breaks chosen requests on purpose.

Tests queue faults (500s, dropped connections, truncated or corrupted bodies) for requests
that match a predicate; everything else is forwarded untouched.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("403", "500", "503", "drop", "truncate", "corrupt")
_ERROR_CODES = {"403": b"AccessDenied", "500": b"InternalError", "503": b"SlowDown"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te"}

Matcher = Callable[[str, str], bool]


@dataclass
class _Fault:
    kind: str
    match: Matcher
    times: int


@dataclass
class FaultPlan:
    """Faults waiting to be applied, and a log of (method, path, fault or None) seen."""

    faults: list[_Fault] = field(default_factory=list)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, match: Matcher, times: int = 1) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self.lock:
            self.faults.append(_Fault(kind, match, times))

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    self.log.append((method, path, fault.kind))
                    return fault.kind
            self.log.append((method, path, None))
            return None

    def pending(self) -> int:
        with self.lock:
            return sum(f.times for f in self.faults)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()


def shard_get(method: str, path: str) -> bool:
    """Matches downloads of shard files."""
    return method == "GET" and "/shards/" in path


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 forwarding to `upstream` (host, port)."""

    def __init__(self, upstream: tuple[str, int]):
        self.plan = FaultPlan()
        self.upstream = upstream
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.plan.take(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault in _ERROR_CODES:
                    msg = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                        + _ERROR_CODES[fault]
                        + b"</Code><Message>injected</Message></Error>"
                    )
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if fault == "corrupt" and data:
                    # Flip one byte and drop the server's checksum headers, as a store without
                    # response checksums would: only the reader's own checksum can catch it.
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    resp_headers = [
                        (k, v)
                        for k, v in resp_headers
                        if not k.lower().startswith("x-amz-checksum")
                    ]
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command == "HEAD":
                    # A HEAD response has no body but reports the object's size, as upstream's.
                    upstream = dict((k.lower(), v) for k, v in resp_headers)
                    self.send_header("Content-Length", upstream.get("content-length", "0"))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
