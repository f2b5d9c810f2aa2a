"""The request gate: what a scoring request must pass before BentoML parses it.

In order, for POST /predict and /predict_file:
1. the API key, when FRAUD_API_KEY is set (401; first, so a stranger learns no limits);
2. the content type the route takes (415);
3. the declared size, from Content-Length (413);
4. the body itself, read here under a deadline (408) and a byte cap that also holds for
   chunked bodies with no Content-Length (413), spooled to disk past 1 MiB;
5. for files, the multipart shape: a boundary, named parts, one `file` part that is a
   file with a sane name, small text fields, nothing unknown (400), so that no client
   mistake reaches BentoML's form parser and comes back as a 500;
6. a scoring slot, taken only now that the body has arrived (429 with Retry-After when
   all are busy): slow uploads hold no slot, so they cannot lock scoring out.

Before any of that, for every request: the header block within MAX_HEADERS and
MAX_HEADER_BYTES (431), a body framed one way only (Content-Length and Transfer-Encoding
together, or two Content-Lengths, are refused and the connection closed, as RFC 9112
section 6.3 asks: a proxy in front may have read the body the other way), and at most
one Authorization header (400: which one a proxy checked is anyone's guess).

No answer redirects to a Location built from the client's Host header: `/schema` answers
as `/schema/` (`/model-card` as `/model-card/`), `/docs` as the docs page at `/`,
`/predict/` as `/predict`, and any other redirect's Location is cut to its path.
"""

from __future__ import annotations

import asyncio
import hmac
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

from serving.scoring import RequestError

SPOOL_IN_MEMORY = 1024 * 1024  # bytes of a body kept in memory; the rest goes to disk
CHUNK = 64 * 1024
MAX_PARTS = 8
MAX_FIELD_BYTES = 1024  # a text field (output_format, threshold)
MAX_FILENAME_BYTES = 255
ALIASES = {"/schema": "/schema/", "/model-card": "/model-card/", "/docs": "/"}
# Browsers send ~10-20 headers and under 8 KiB; h11 already stops a block that arrives in
# pieces at 16 KiB, these also hold for one sent in a single write.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class RouteRule:
    content_type: str
    max_bytes: int
    fields: tuple[str, ...] = ()  # multipart: the text fields it takes besides `file`
    also: RouteRule | None = None  # the same route's rule for a second content type
    target: str | None = None  # the path the app answers at (a mounted app's "/route/")

    def for_type(self, kind: str) -> RouteRule:
        if kind != self.content_type and self.also is not None and kind == self.also.content_type:
            return self.also
        return self

    def accepted(self) -> str:
        return " or ".join([self.content_type] + ([self.also.content_type] if self.also else []))


async def read_body(receive: Callable, max_bytes: int, seconds: float) -> IO[bytes]:
    """The whole body, spooled, within `seconds` and `max_bytes` (chunked or not)."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    size = 0
    try:
        async with asyncio.timeout(seconds):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RequestError(400, "disconnected", "the client went away mid-body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, "max-bytes", f"the body is over the limit of "
                                  f"{max_bytes} bytes")  # fmt: skip
                spool.write(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        spool.close()
        raise RequestError(
            408, "body-timeout", f"the body did not arrive within {seconds:g} s"
        ) from None
    except RequestError:
        spool.close()
        raise
    spool.seek(0)
    return spool


class _PartHeads:
    """The multipart parser's callbacks: each part's Content-Disposition and data size."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.header: dict[str, bytes] = {}
        self.ended = False

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self._add("field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("value", data[start:end]),
            "on_header_end": self.header_end,
            "on_part_data": self.part_data,
            "on_end": lambda: setattr(self, "ended", True),
        }

    def part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        self.parts.append({"size": 0})
        self.header.clear()

    def _add(self, key: str, data: bytes) -> None:
        self.header[key] = self.header.get(key, b"") + data

    def header_end(self) -> None:
        if self.header.get("field", b"").lower() == b"content-disposition":
            kind, params = parse_options_header(self.header.get("value", b""))
            self.parts[-1].update(kind=kind, params=params)
        self.header.clear()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1]["size"] += end - start


def check_multipart(spool: IO[bytes], content_type: bytes, fields: tuple[str, ...]) -> None:
    """Refuse a multipart body BentoML's form parser would choke on (or answer with 500).
    Reads the spooled body once, keeping nothing but part headers."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise _malformed("the multipart body has no boundary")
    heads = _PartHeads()
    parser = MultipartParser(boundary, heads.callbacks())
    try:
        while chunk := spool.read(CHUNK):
            parser.write(chunk)
        parser.finalize()
    except RequestError:
        raise
    except Exception:  # the parser's own errors: the body is not valid multipart
        raise _malformed("the multipart body is malformed") from None
    finally:
        spool.seek(0)
    if not heads.ended:
        raise _malformed("the multipart body is incomplete (no final boundary)")
    _check_parts(heads.parts, fields)


def _malformed(message: str) -> RequestError:
    return RequestError(400, "multipart", message)


def _check_parts(parts: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    names = []
    for part in parts:
        params = part.get("params", {})
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if part.get("kind") != b"form-data" or not name:
            raise _malformed("every part needs a form-data name")
        names.append(name)
        if name == "file":
            filename = params.get(b"filename")
            if filename is None:
                raise _malformed("'file' must be an uploaded file, not a text field")
            if len(filename) > MAX_FILENAME_BYTES:
                raise _malformed(f"the file name is over {MAX_FILENAME_BYTES} bytes")
        elif name not in fields:
            accepted = ", ".join(("file", *fields))
            raise _malformed(f"unknown field '{name[:40]}'; this route takes {accepted}")
        elif part["size"] > MAX_FIELD_BYTES:
            raise _malformed(f"the field '{name}' is over {MAX_FIELD_BYTES} bytes")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _malformed(f"the field '{repeated[0]}' is sent more than once")
    if "file" not in names:
        raise _malformed("no 'file' part")


def framing_problem(headers: list[tuple[bytes, bytes]]) -> RequestError | None:
    """What is wrong with a request's header block as a whole, or None."""
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        return RequestError(431, "header-fields", f"the request has {len(headers)} header "
                            f"fields, {size} bytes; the limits are {MAX_HEADERS} fields and "
                            f"{MAX_HEADER_BYTES} bytes")  # fmt: skip
    names = [name.lower() for name, _ in headers]
    if b"transfer-encoding" in names and b"content-length" in names:
        return RequestError(400, "framing", "Content-Length and Transfer-Encoding sent "
                            "together; send one")  # fmt: skip
    for name in (b"content-length", b"authorization"):
        if names.count(name) > 1:
            return RequestError(400, "framing", f"the {name.decode()} header is sent more "
                                "than once")  # fmt: skip
    return None


def relative_redirects(send: Callable) -> Callable:
    """An ASGI send that cuts a redirect's Location to its path and query: Starlette builds
    it from the Host header, which the client chose."""

    async def send_relative(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] in REDIRECTS:
            message = {**message, "headers": [
                (name, _path_only(value) if name.lower() == b"location" else value)
                for name, value in message.get("headers", [])
            ]}  # fmt: skip
        await send(message)

    return send_relative


def _path_only(location: bytes) -> bytes:
    parts = urlsplit(location.decode("latin-1"))
    path = "/" + parts.path.lstrip("/")  # never "//host": that is a Host again
    return (path + (f"?{parts.query}" if parts.query else "")).encode("latin-1")


def _authorized(headers: dict[bytes, bytes], key: str | None) -> bool:
    if key is None:
        return True
    sent = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = sent.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


class RequestGate:
    """ASGI middleware: the checks above, then the request goes on with its body replayed."""

    def __init__(self, app: Any, routes: dict[str, RouteRule], api_key: str | None,
                 body_seconds: float, max_in_flight: int, on_refused: Callable[[str], None],
                 retry_after_seconds: int = 1) -> None:  # fmt: skip
        self.app, self.routes, self.api_key = app, routes, api_key
        self.body_seconds, self.max_in_flight = body_seconds, max_in_flight
        self.on_refused, self.retry_after = on_refused, retry_after_seconds
        self.in_flight = 0  # one event loop per worker: a plain counter is enough

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = framing_problem(scope.get("headers") or [])
        if problem is not None:
            return await self._refuse(scope, receive, send, problem)
        send = relative_redirects(send)
        path = scope.get("path", "")
        if path in ALIASES and scope.get("method") in ("GET", "HEAD"):
            scope = _at(scope, ALIASES[path])
        rule = self.routes.get(path.rstrip("/"))
        if rule is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        scope = _at(scope, rule.target or path.rstrip("/"))  # /predict/ is /predict, no redirect
        try:
            spool = await self._admit_body(scope, receive, rule)
        except RequestError as refused:
            return await self._refuse(scope, receive, send, refused)
        if self.in_flight >= self.max_in_flight:
            spool.close()
            busy = RequestError(429, "busy", "all scoring slots are busy; retry shortly")
            return await self._refuse(scope, receive, send, busy)
        self.in_flight += 1
        try:
            await self.app(scope, _replay(spool, receive), send)
        finally:
            self.in_flight -= 1
            spool.close()

    async def _admit_body(self, scope: dict, receive: Any, rule: RouteRule) -> IO[bytes]:
        headers = dict(scope.get("headers") or [])
        if not _authorized(headers, self.api_key):
            raise RequestError(401, "auth", "missing or wrong API key")
        sent = headers.get(b"content-type", b"")
        kind = sent.decode("latin-1").split(";")[0].strip().lower()
        rule = rule.for_type(kind)
        if kind != rule.content_type:
            raise RequestError(415, "content-type", f"content type '{kind or 'none'}' is not "
                          f"accepted here; send {rule.accepted()}")  # fmt: skip
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > rule.max_bytes:
            raise RequestError(413, "max-bytes", f"the request has {int(length)} bytes; the limit "
                          f"is {rule.max_bytes}")  # fmt: skip
        spool = await read_body(receive, rule.max_bytes, self.body_seconds)
        if rule.content_type == "multipart/form-data":
            try:
                await asyncio.to_thread(check_multipart, spool, sent, rule.fields)
            except RequestError:
                spool.close()
                raise
        return spool

    async def _refuse(self, scope: dict, receive: Any, send: Any, refused: RequestError) -> None:
        self.on_refused(refused.body["rule"])
        headers = {"Retry-After": str(self.retry_after)} if refused.status == 429 else None
        if refused.status in (408, 413, 431) or refused.body["rule"] == "framing":
            headers = {"Connection": "close"}  # the body is not read (or not trusted)
        response = JSONResponse(
            refused.body,
            status_code=refused.status,
            headers=headers,
        )
        await response(scope, receive, send)


def _at(scope: dict, path: str) -> dict:
    return {**scope, "path": path, "raw_path": path.encode()}


def _replay(spool: IO[bytes], receive: Callable) -> Callable:
    """An ASGI receive that hands out the spooled body, then the client's own messages
    (a disconnect)."""
    done = False

    async def replay() -> dict:
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(CHUNK)
        if len(chunk) < CHUNK:
            done = True
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay
