"""Connections: what uvicorn's HTTP/1.1 protocols do not bound by themselves.

uvicorn times out idle keep-alive connections, but not a connection that never finishes its request headers
(slowloris): enough of them take every file descriptor, accept() fails, and the server stops answering even
/health. Here every connection has `header_timeout` seconds to deliver a request's headers (then a 408 and
close), and at most `max_connections` are open: a new one evicts the connection that has waited longest for
its headers, or, when every connection is running a request, is answered 503 and closed. The descriptor limit
is raised to its hard limit at start, and `max_connections` kept below it, so accept() never runs out.
"""

from __future__ import annotations

import logging
import resource
import time

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("glimage.serve")
RESERVED_FDS = 96  # descriptors kept for the process itself: model files, threads' pipes, logs, the listener


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(wanted: int, fd_limit: int) -> int:
    """`wanted`, lowered to what the descriptor limit allows (with RESERVED_FDS kept for the process)."""
    return max(8, min(wanted, fd_limit - RESERVED_FDS))


def guarded_protocol(max_connections: int, header_timeout: float, base=AutoHTTPProtocol):
    """uvicorn's HTTP protocol class (h11 or httptools) with header deadlines and a connection limit."""

    class Guarded(base):
        waiting_since: float | None  # monotonic time the current request's first byte (or the connection) came

        def connection_made(self, transport):
            self.waiting_since = time.monotonic()
            super().connection_made(transport)
            _sweeper(self.loop, self.connections, header_timeout)
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None]
                if idle:  # the longest wait for headers gives way: new clients keep getting in under a flood
                    _close(min(idle, key=lambda c: c.waiting_since), 503, "too many connections")
                else:
                    _close(self, 503, "too many connections")

        def data_received(self, data):
            if self.waiting_since is None and _between_requests(self):
                self.waiting_since = time.monotonic()  # a next request on a kept-alive connection begins
            super().data_received(data)
            if not _between_requests(self):
                self.waiting_since = None  # its headers are in: the body and the answer have their own limits

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _between_requests(conn) -> bool:
    cycle = getattr(conn, "cycle", None)
    return cycle is None or cycle.response_complete


def _close(conn, status: int, why: str) -> None:
    transport = getattr(conn, "transport", None)
    if transport is None or transport.is_closing():
        return
    body = f'{{"error": {{"message": "{why}", "type": "server_error", "param": null, "code": "{status}"}}}}'.encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    f"connection: close\r\n\r\n".encode() + body)
    conn.waiting_since = None
    transport.close()


_sweepers: dict = {}  # event loop -> its timer handle


def _sweeper(loop, connections: set, header_timeout: float) -> None:
    """Once per event loop: every second, close the connections whose headers are overdue."""
    if _sweepers.get(loop) is not None:
        return

    def sweep():
        now = time.monotonic()
        for conn in list(connections):
            since = getattr(conn, "waiting_since", None)
            if since is not None and now - since > header_timeout:
                _close(conn, 408, f"request headers did not arrive within {header_timeout:g} s")
        _sweepers[loop] = loop.call_later(1.0, sweep) if not loop.is_closed() else None

    _sweepers[loop] = loop.call_later(1.0, sweep)


class AcceptErrors(logging.Filter):
    """asyncio logs every failed accept() with a traceback (descriptors exhausted: many per second); keep one
    line per minute."""

    def __init__(self):
        super().__init__()
        self.last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if "socket.accept() out of system resource" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        record.exc_info, record.exc_text = None, None
        record.msg, record.args = "accept() failed: out of file descriptors (raise ulimit -n or lower " \
            "--max-connections)", ()
        return True
