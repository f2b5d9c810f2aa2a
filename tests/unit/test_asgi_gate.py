"""The request gate (serving/gate.py) in-process: a real Starlette app behind it, driven
through httpx's ASGI transport. Each refusal comes before the app sees the request; what
passes reaches the app with its body intact."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.gate import MAX_FIELD_BYTES, RequestGate, RouteRule

KEY = "s3cret-key"


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "bytes": len(body), "head": body[:16].hex()})


APP = Starlette(
    routes=[
        Route("/predict", _echo, methods=["POST"]),
        Route("/predict_file", _echo, methods=["POST"]),
        Route("/schema/", _echo, methods=["GET"]),
    ]
)


def gate(**overrides) -> tuple[RequestGate, list[str]]:
    refused: list[str] = []
    options = {
        "routes": {
            "/predict": RouteRule("application/json", 4096),
            "/predict_file": RouteRule("multipart/form-data", 1 << 22, fields=("threshold",)),
        },
        "api_key": None,
        "body_seconds": 2.0,
        "max_in_flight": 4,
        "on_refused": refused.append,
        **overrides,
    }
    return RequestGate(APP, **options), refused


def send(app: RequestGate, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_json_within_the_rules_reaches_the_app_intact() -> None:
    app, refused = gate()
    body = json.dumps({"transactions": [{"Amount": 1.0}]}).encode()
    answer = send(
        app, "POST", "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200 and answer.json()["bytes"] == len(body)
    assert refused == []


@pytest.mark.parametrize(
    ("headers", "status", "rule"),
    [
        ({"content-type": "text/plain"}, 415, "content-type"),
        ({}, 415, "content-type"),
        ({"content-type": "application/json", "content-length": "99999"}, 413, "max-bytes"),
    ],
)
def test_refusals_before_the_body(headers: dict, status: int, rule: str) -> None:
    app, refused = gate()
    answer = send(app, "POST", "/predict", content=b"{}", headers=headers)
    assert answer.status_code == status and answer.json()["rule"] == rule
    assert refused == [rule]


def test_a_chunked_body_over_the_cap_is_refused_and_the_connection_closed() -> None:
    async def chunks():
        for _ in range(10):
            yield b"x" * 1024

    app, _ = gate()
    answer = send(
        app, "POST", "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413 and answer.json()["rule"] == "max-bytes"
    assert answer.headers["connection"] == "close"


def test_a_body_slower_than_the_deadline_gets_408() -> None:
    async def slow():
        yield b"{"
        await asyncio.sleep(1.0)
        yield b"}"

    app, _ = gate(body_seconds=0.3)
    answer = send(
        app, "POST", "/predict", content=slow(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 408 and answer.json()["rule"] == "body-timeout"


def test_api_key_comes_first_and_is_compared_as_a_bearer_token() -> None:
    app, refused = gate(api_key=KEY)
    plain = {"content-type": "text/plain"}  # wrong type too: the key is checked first
    assert send(app, "POST", "/predict", content=b"{}", headers=plain).status_code == 401
    for wrong in (KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer "):
        headers = {"content-type": "application/json", "authorization": wrong}
        assert send(app, "POST", "/predict", content=b"{}", headers=headers).status_code == 401
    good = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    assert send(app, "POST", "/predict", content=b"{}", headers=good).status_code == 200
    assert refused == ["auth"] * 5


def test_all_slots_busy_gives_429_with_retry_after() -> None:
    app, refused = gate(max_in_flight=0)
    answer = send(
        app, "POST", "/predict", content=b"{}", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    assert refused == ["busy"]


def test_schema_alias_answers_without_a_redirect() -> None:
    app, _ = gate()
    answer = send(app, "GET", "/schema", headers={"host": "evil.example"})
    assert answer.status_code == 200 and answer.json()["path"] == "/schema/"


def _multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = "b0undary"
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_a_file_upload_over_a_megabyte_is_replayed_byte_for_byte() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: spooled to disk, replayed in 64 KiB chunks
    body, headers = _multipart(("file", "t.csv", data), ("threshold", None, b"0.5"))
    app, refused = gate()
    answer = send(app, "POST", "/predict_file", content=body, headers=headers)
    assert answer.status_code == 200 and answer.json()["bytes"] == len(body)
    assert refused == []


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((("threshold", None, b"0.5"),), "no 'file' part"),
        ((("file", None, b"Time\n1"),), "must be an uploaded file"),
        ((("file", "a.csv", b"x"), ("other", None, b"1")), "unknown field 'other'"),
        ((("file", "a.csv", b"x"), ("file", "b.csv", b"y")), "sent more than once"),
        ((("file", "a.csv", b"x"), ("threshold", None, b"1" * (MAX_FIELD_BYTES + 1))), "over"),
        ((("file", "n" * 300, b"x"),), "file name is over"),
    ],
)
def test_multipart_mistakes_are_400_naming_the_problem(parts: tuple, message: str) -> None:
    body, headers = _multipart(*parts)
    app, refused = gate()
    answer = send(app, "POST", "/predict_file", content=body, headers=headers)
    assert answer.status_code == 400 and message in answer.json()["error"]
    assert refused == ["multipart"]


def test_multipart_without_boundary_or_end_is_400() -> None:
    app, _ = gate()
    no_boundary = {"content-type": "multipart/form-data"}
    assert send(app, "POST", "/predict_file", content=b"x", headers=no_boundary).status_code == 400
    body, headers = _multipart(("file", "a.csv", b"x"))
    cut = send(app, "POST", "/predict_file", content=body[:-12], headers=headers)
    assert cut.status_code == 400 and "incomplete" in cut.json()["error"]
