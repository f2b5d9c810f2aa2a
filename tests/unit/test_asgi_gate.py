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

from serving.gate import MAX_FIELD_BYTES, MAX_HEADERS, RequestGate, RouteRule

KEY = "s3cret-key"


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "bytes": len(body), "head": body[:16].hex()})


APP = Starlette(
    routes=[
        Route("/predict", _echo, methods=["POST"]),
        Route("/predict_file", _echo, methods=["POST"]),
        Route("/schema/", _echo, methods=["GET"]),
        Route("/other", _echo, methods=["GET"]),
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


def test_a_trailing_slash_is_the_route_itself_and_no_redirect_echoes_the_host() -> None:
    app, _ = gate()
    json_type = {"content-type": "application/json", "host": "evil.example"}
    answer = send(app, "POST", "/predict/", content=b"{}", headers=json_type)
    assert answer.status_code == 200 and answer.json()["path"] == "/predict"
    # Any other redirect (Starlette's own, for a slash) points at a path, not at a host.
    answer = send(app, "GET", "/other/?a=1", headers={"host": "evil.example"})
    assert answer.status_code == 307 and answer.headers["location"] == "/other?a=1"


def raw(app: RequestGate, headers: list[tuple[bytes, bytes]], path: str = "/predict") -> dict:
    """One request with exactly these header fields (httpx would tidy them): the status,
    the response headers and the body of the answer."""
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "headers": headers, "query_string": b"", "http_version": "1.1"}  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def record(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, record))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return {"status": start["status"], "headers": dict(start["headers"]), "body": body}


JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ([JSON, (b"content-length", b"2"), (b"transfer-encoding", b"chunked")], 400,
         "Content-Length and Transfer-Encoding"),
        ([JSON, (b"content-length", b"2"), (b"content-length", b"2")], 400, "content-length"),
        ([JSON, (b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], 400,
         "authorization header is sent more than once"),
        ([JSON] + [(b"x-h%d" % i, b"1") for i in range(MAX_HEADERS)], 431, "header fields"),
        ([JSON, (b"x-big", b"a" * 17_000)], 431, "header fields"),
    ],
)  # fmt: skip
def test_ambiguous_framing_and_oversized_header_blocks_are_refused_and_closed(
    headers: list, status: int, message: str
) -> None:
    app, refused = gate(api_key=KEY)  # before the key: framing is checked for everyone
    answer = raw(app, headers)
    assert answer["status"] == status
    assert message in json.loads(answer["body"])["error"]
    assert answer["headers"][b"connection"] == b"close"
    assert refused == [json.loads(answer["body"])["rule"]]


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
