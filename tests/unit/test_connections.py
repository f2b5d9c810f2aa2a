"""The connection rules (serving/connections.py) on a real uvicorn server in this process,
bound to a free loopback port: silent and slowloris sockets are closed at the header
deadline, and past the cap the longest-idle connection makes room for a new request."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serving.connections import GuardedH11Protocol

HEADER_SECONDS = 0.5
CAP = 4
REQUEST = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


async def _slow(request) -> PlainTextResponse:  # noqa: ANN001
    await asyncio.sleep(float(request.query_params.get("s", "0")))
    return PlainTextResponse("ok")


class Guarded(GuardedH11Protocol):
    header_seconds = HEADER_SECONDS
    max_connections = CAP


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(routes=[Route("/", _slow)])
    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=Guarded, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield listener.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    return client


def _answer(client: socket.socket) -> bytes:
    """One whole answer (head and Content-Length bytes of body), or what came before EOF."""
    data = b""
    while chunk := client.recv(65536):
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if _:
            length = [
                line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
            ]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    return data


def test_a_silent_socket_gets_408_and_is_closed(port: int) -> None:
    client = _connect(port)
    started = time.monotonic()
    assert client.recv(1024).startswith(b"HTTP/1.1 408")
    assert client.recv(1024) == b""  # closed
    assert HEADER_SECONDS <= time.monotonic() - started < HEADER_SECONDS + 2


def test_a_slowloris_is_cut_at_the_deadline(port: int) -> None:
    client = _connect(port)
    started = time.monotonic()
    with pytest.raises(OSError):  # noqa: PT012
        for byte in REQUEST[:-2]:
            client.send(bytes([byte]))
            time.sleep(0.1)
    assert time.monotonic() - started < HEADER_SECONDS + 2


def test_a_kept_alive_connection_serves_several_requests(port: int) -> None:
    client = _connect(port)
    for _ in range(3):
        client.send(REQUEST)
        assert _answer(client).startswith(b"HTTP/1.1 200")


def test_past_the_cap_the_longest_idle_connection_makes_room(port: int) -> None:
    idle = [_connect(port) for _ in range(CAP)]
    time.sleep(0.1)
    fresh = _connect(port)
    fresh.send(REQUEST)
    assert _answer(fresh).startswith(b"HTTP/1.1 200")
    assert idle[0].recv(1024) == b""  # the oldest idle one was closed for it


def test_with_every_connection_busy_a_new_one_gets_503(port: int) -> None:
    busy = [_connect(port) for _ in range(CAP)]
    for client in busy:
        client.send(b"GET /?s=2 HTTP/1.1\r\nhost: t\r\n\r\n")
    time.sleep(0.3)
    extra = _connect(port)
    assert extra.recv(1024).startswith(b"HTTP/1.1 503")
    for client in busy:
        assert _answer(client).startswith(b"HTTP/1.1 200")
