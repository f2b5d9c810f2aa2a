"""Connections that cannot starve a worker: a header deadline and a cap per worker.

uvicorn (under `bentoml serve`) closes a keep-alive connection 5 s after an answer, but a
connection that never sends a request, or sends its headers a byte at a time, is kept for
ever: 300 silent sockets stayed open through a 75 s probe, a slowloris was held for 40 s,
and with the open-file limit at 1,024, 2,100 idle sockets made normal requests time out,
with nothing logged. This protocol (uvicorn's own h11 one, plus two rules) fixes that:

- the header block must arrive within `header_seconds` of the connection or of the
  previous answer on it; otherwise 408 and the connection is closed;
- at most `max_connections` per worker (and always below the open-file limit, so accept()
  keeps working): a new connection past the cap closes the longest-idle one (idle: no
  request in progress), or, if every connection is busy, is answered 503 and closed.

BentoML builds uvicorn's Config without a protocol argument, so `install()` makes this the
protocol uvicorn's "auto" choice loads (a worker imports the service before uvicorn loads
its config).
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from uvicorn import config as uvicorn_config
from uvicorn.protocols.http.h11_impl import H11Protocol

FD_RESERVE = 128  # open files a worker needs besides client sockets (model, logs, pipes)

# Under "bentoml": the server only prints its own loggers' records.
log = logging.getLogger("bentoml.fraud_scoring")

TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BUSY_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\n"
            b"connection: close\r\n\r\n")  # fmt: skip


def connection_cap(wanted: int) -> int:
    """`wanted`, kept below this process' open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class GuardedH11Protocol(H11Protocol):
    header_seconds = 10.0
    max_connections = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Any = None
        self._idle_since = self.loop.time()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._close_longest_idle():
            log.warning("connection refused: all %d connections busy", self.max_connections)
            transport.write(BUSY_503)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and not self._in_request():
            self._arm()  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)
        if self._in_request():
            self._disarm()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_seconds, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.write(TIMEOUT_408)
            self.transport.close()

    def _close_longest_idle(self) -> bool:
        idle = [c for c in self.connections if c is not self and _idle(c)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest._disarm()
        oldest.transport.close()
        return True


def _idle(connection: Any) -> bool:
    return isinstance(connection, GuardedH11Protocol) and not connection._in_request()


def install(header_seconds: float, max_connections: int) -> None:
    """Make uvicorn's "auto" HTTP protocol this one, with these limits."""
    GuardedH11Protocol.header_seconds = header_seconds
    GuardedH11Protocol.max_connections = connection_cap(max_connections)
    uvicorn_config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedH11Protocol"
