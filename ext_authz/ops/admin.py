"""The admin HTTP listener (plain asyncio, HTTP/1.1): /metrics, /healthz, /readyz,
/tokens/NAME, and the operator's status page at / with its JSON under /api/.

The page is read-only: GETs of state, and two POSTs (try a caller, preview a change) that
compute an answer and keep nothing. It loads nothing from any other origin (its CSP says
`default-src 'self'`, no inline script), and every string it shows goes in as text. With
`admin.auth` the page and its JSON take the token (Bearer, or HTTP Basic's password so that
a browser's own prompt is the login); /metrics, /healthz, /readyz and /tokens stay open.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..contract import TOKENS_PATH
from ..policy.config import split_listen

log = logging.getLogger(__name__)

_MAX_REQUEST_HEAD = 8192
_MAX_REQUEST_BODY = 256 * 1024  # a pasted config, a tried request
_READ_TIMEOUT_S = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 415: "Unsupported Media Type",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
_PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
               "/page.js": ("page.js", "text/javascript; charset=utf-8"),
               "/page.css": ("page.css", "text/css; charset=utf-8")}
_PAGE_HEADERS = (
    ("content-security-policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none';"
                                " form-action 'none'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the service takes traffic, and each server without a usable token (with the
    reason): what readiness waits for before, what answers 503 after."""

    ready: bool
    unavailable: dict[str, str]

    def to_json(self) -> dict[str, object]:
        # A token lost after start does not take the sidecar out of service (every other
        # server would fail with it): it is said, by name, as what answers 503 now.
        key = "unavailable" if self.ready else "waiting_for"
        return {"ready": self.ready, key: self.unavailable}


class OperatorPage(Protocol):
    """What the status page asks of the sidecar (edges.operator.OperatorView)."""

    def status(self, peer: str, x_forwarded_for: str | None) -> dict[str, Any]: ...
    def decisions(self, **wanted: str) -> dict[str, Any]: ...
    async def try_caller(self, asked: dict[str, Any]) -> dict[str, Any]: ...
    def preview(self, asked: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str


@dataclass(slots=True)
class _Answer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _RateLimit:
    """A token bucket: `rate` a second, `burst` at once, for the POSTs that compute."""

    def __init__(self, rate: float = 5.0, burst: float = 10.0) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class AdminServer:
    """Serve the admin endpoints on one address until closed."""

    def __init__(
        self, listen: str, registry: CollectorRegistry, readiness: Callable[[], Readiness],
        token_usable: Callable[[str, str | None], bool] = lambda server, node: False,
        page: OperatorPage | None = None,
        page_token: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.listen = listen
        self._registry = registry
        self._readiness = readiness
        self._token_usable = token_usable
        self._page = page
        self._page_token = page_token  # read when asked: a reload may change it
        self._limit = _RateLimit()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.listen.startswith("unix:"):
            self._server = await asyncio.start_unix_server(self._serve, self.listen[5:])
        else:
            host, port = split_listen(self.listen)
            self._server = await asyncio.start_server(
                self._serve, host.strip("[]"), port, reuse_address=True
            )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _route(self, request: _Request) -> _Answer:
        path = request.path
        if path in ("/metrics", "/healthz", "/readyz") or path.startswith(TOKENS_PATH):
            if request.method not in ("GET", "HEAD"):
                return _text(405, "method not allowed")
            return self._open(request)
        if self._page is None or not (path in _PAGE_FILES or path.startswith("/api/")):
            return _text(404, "not found")
        if not self._authorized(request.headers.get("authorization", "")):
            return _Answer(401, "text/plain", b"the status page needs the admin token\n",
                           (("www-authenticate", 'Basic realm="mcp-ext-authz",'
                                                 ' charset="UTF-8"'), *_PAGE_HEADERS))
        answer = await self._page_route(request, self._page)
        answer.headers = (*answer.headers, *_PAGE_HEADERS)
        return answer

    def _open(self, request: _Request) -> _Answer:
        path = request.path
        if path == "/metrics":
            return _Answer(200, CONTENT_TYPE_LATEST, generate_latest(self._registry))
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            readiness = self._readiness()
            return _Answer(200 if readiness.ready else 503, "application/json",
                           json.dumps(readiness.to_json(), indent=1).encode() + b"\n")
        # The native data path's watchdog: Envoy health-checks each oauth2 server's endpoint
        # here, and sends it nothing while this is not 200 (or not answered). `?node=ID`:
        # asked for that Envoy, which must hold the token itself.
        if self._token_usable(path[len(TOKENS_PATH):], request.query.get("node")):
            return _text(200, "usable")
        return _text(503, "no usable token")

    def _authorized(self, header: str) -> bool:
        token = self._page_token()
        if token is None:  # no admin.auth: the config allows that on this host alone
            return True
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            offered = value.strip()
        elif scheme.lower() == "basic":
            try:
                offered = base64.b64decode(value.strip(), validate=True).decode().partition(
                    ":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(offered.encode(), token.encode())

    async def _page_route(self, request: _Request, page: OperatorPage) -> _Answer:
        path, method = request.path, request.method
        if path in _PAGE_FILES:
            if method not in ("GET", "HEAD"):
                return _text(405, "method not allowed")
            name, content_type = _PAGE_FILES[path]
            return _Answer(200, content_type, _page_file(name))
        if path in ("/api/status", "/api/decisions"):
            if method not in ("GET", "HEAD"):
                return _text(405, "method not allowed")
            if path == "/api/status":
                return _json(200, page.status(request.peer,
                                              request.headers.get("x-forwarded-for")))
            return _json(200, page.decisions(**{k: v for k, v in request.query.items()
                                                if k in ("server", "network", "reason")}))
        if path in ("/api/try", "/api/preview"):
            if method != "POST":
                return _text(405, "method not allowed")
            # JSON only: a form another site posts cannot be (it would need CORS first).
            if request.headers.get("content-type", "").split(";")[0].strip() != (
                    "application/json"):
                return _text(415, "send application/json")
            if not self._limit.take():
                return _json(429, {"error": "too many requests: a few a second at most"})
            try:
                asked = json.loads(request.body or b"{}")
                if not isinstance(asked, dict):
                    raise ValueError("give a JSON object")
                if path == "/api/try":
                    return _json(200, await page.try_caller(asked))
                return _json(200, page.preview(asked))
            except ValueError as exc:  # JSON errors too
                return _json(400, {"error": str(exc)})
        return _text(404, "not found")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request = await _read(reader, writer)
            method = request.method
            answer = await self._route(request)
        except _TooLarge:
            answer = _text(413, "too large")
        except (TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            answer = _text(400, "bad request")
        except Exception:
            log.exception("admin request failed")
            answer = _text(500, "internal error")
        head = (f"HTTP/1.1 {answer.status} {_REASONS[answer.status]}\r\n"
                f"content-type: {answer.content_type}\r\n"
                f"content-length: {len(answer.body)}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in answer.headers)
                + "connection: close\r\n\r\n").encode()
        try:
            writer.write(head if method == "HEAD" else head + answer.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class _TooLarge(Exception):
    pass


async def _read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_REQUEST_HEAD:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("a header line without a colon")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "transfer-encoding" in headers:
        raise ValueError("send a content-length")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise ValueError("content-length is not a number")
    if int(length) > _MAX_REQUEST_BODY:
        raise _TooLarge
    if int(length):
        body = await reader.readexactly(int(length))
    path, _, query = target.partition("?")
    peer = writer.get_extra_info("peername")
    return _Request(method, path, {k: v[0] for k, v in urllib.parse.parse_qs(query).items()},
                    headers, body, peer[0] if isinstance(peer, tuple) else "")


def _page_file(name: str) -> bytes:
    return (resources.files(__package__) / "page" / name).read_bytes()


def _text(status: int, text: str) -> _Answer:
    return _Answer(status, "text/plain", text.encode() + b"\n")


def _json(status: int, value: object) -> _Answer:
    return _Answer(status, "application/json", json.dumps(value, indent=1).encode() + b"\n")
