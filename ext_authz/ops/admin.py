"""The admin HTTP listener: /metrics, /healthz, /readyz, /tokens/NAME (plain asyncio, HTTP/1.1,
GET only)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..contract import TOKENS_PATH
from ..policy.config import split_listen

log = logging.getLogger(__name__)

_MAX_REQUEST_HEAD = 8192
_READ_TIMEOUT_S = 5.0


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


class AdminServer:
    """Serve the admin endpoints on one address until closed."""

    def __init__(
        self, listen: str, registry: CollectorRegistry, readiness: Callable[[], Readiness],
        token_usable: Callable[[str, str | None], bool] = lambda server, node: False,
    ) -> None:
        self.listen = listen
        self._registry = registry
        self._readiness = readiness
        self._token_usable = token_usable
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

    def _route(self, method: str, target: str) -> tuple[int, str, bytes]:
        path, _, query = target.partition("?")
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            readiness = self._readiness()
            body = json.dumps(readiness.to_json(), indent=1).encode() + b"\n"
            return (200 if readiness.ready else 503), "application/json", body
        if path.startswith(TOKENS_PATH):
            # The native data path's watchdog: Envoy health-checks each oauth2 server's
            # endpoint here, and sends it nothing while this is not 200 (or not answered).
            # `?node=ID`: asked for that Envoy, which must hold the token itself.
            nodes = urllib.parse.parse_qs(query).get("node")
            if self._token_usable(path[len(TOKENS_PATH):], nodes[0] if nodes else None):
                return 200, "text/plain", b"usable\n"
            return 503, "text/plain", b"no usable token\n"
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST_HEAD:
                raise ValueError("request head too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, content_type, body = self._route(method, path)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
            method = "GET"
        except Exception:
            log.exception("admin request failed")
            status, content_type, body = 500, "text/plain", b"internal error\n"
            method = "GET"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}[status]
        head_out = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head_out if method == "HEAD" else head_out + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
