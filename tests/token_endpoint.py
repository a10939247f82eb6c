"""A real OAuth2 token endpoint on loopback for the tests: counts requests, misbehaves on demand.

Raw asyncio HTTP/1.1 so that it can also do what a framework would not: close the
connection mid-request, drip a body byte by byte, or answer with a megabyte.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from tests.loop_thread import LoopThread

EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
MODES = (
    "ok", "status", "garbage", "list", "no_token", "wrong_type", "huge", "close", "html",
    "drip", "unsafe_token",
)


@dataclass
class TokenRequest:
    headers: dict[str, str]
    form: dict[str, str]
    client_id: str | None
    client_secret: str | None


@dataclass
class TokenEndpoint:
    mode: str = "ok"
    status: int = 500
    delay_s: float = 0.0
    expires_in: Any = 3600
    omit_expires_in: bool = False
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    exchanges: dict[str, int] = field(default_factory=dict)  # RFC 8693: per subject
    # When each token was issued (time.monotonic()) and for how long: token -> (at, expires_in)
    lifetimes: dict[str, tuple[float, Any]] = field(default_factory=dict)
    port: int = 0
    host: str = "127.0.0.1"
    _server: asyncio.base_events.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/oauth2/token"

    @property
    def count(self) -> int:
        return len(self.requests)

    async def start(self) -> TokenEndpoint:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    def healthy(self) -> None:
        self.mode, self.delay_s, self.expires_in, self.omit_expires_in = "ok", 0.0, 3600, False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, _, value = line.partition(":")
                        headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep_open = await self._respond(headers, body, writer)
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _record(self, headers: dict[str, str], body: bytes) -> TokenRequest:
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = headers.get("authorization", "")
        if auth.startswith("Basic "):
            raw_id, _, raw_secret = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        request = TokenRequest(headers, form, client_id, secret)
        self.requests.append(request)
        return request

    def _exchange(self, request: TokenRequest) -> tuple[int, bytes]:
        """RFC 8693, as an IdP that trusts the subject token's own claims would answer (the
        signature is Envoy's to check, before the sidecar sees the token): a token naming
        the subject, or 400 invalid_grant for an expired or unreadable one."""
        try:
            payload = json.loads(base64.urlsafe_b64decode(
                request.form["subject_token"].split(".")[1] + "=="))
            subject, expires = str(payload["sub"]), float(payload["exp"])
        except (KeyError, ValueError, IndexError):
            return 400, b'{"error": "invalid_request"}'
        if expires <= time.time():
            return 400, b'{"error": "invalid_grant"}'
        self.exchanges[subject] = self.exchanges.get(subject, 0) + 1
        token = f"tx-{subject}-{request.form.get('audience', '')}-{len(self.requests)}"
        self.issued.append(token)
        self.lifetimes[token] = (time.monotonic(), self.expires_in)
        payload = {"access_token": token, "token_type": "Bearer",
                   "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}
        if not self.omit_expires_in:
            payload["expires_in"] = self.expires_in
        return 200, json.dumps(payload).encode()

    async def _respond(
        self, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        request = self._record(headers, body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        mode = self.mode
        if mode == "close":
            return False
        status, content_type = 200, "application/json"
        exchange = request.form.get("grant_type") == EXCHANGE_GRANT
        if exchange and mode == "ok":
            status, data = self._exchange(request)
        elif mode == "ok" or mode == "wrong_type" or mode == "unsafe_token":
            token = f"tok-{request.client_id}-{len(self.requests)}".replace(" ", "_")
            if mode == "unsafe_token":
                token = "tok\r\nx-injected: 1"
            self.issued.append(token)
            self.lifetimes[token] = (time.monotonic(), self.expires_in)
            payload: dict[str, Any] = {
                "access_token": token,
                "token_type": "mac" if mode == "wrong_type" else "bearer",
            }
            if not self.omit_expires_in:
                payload["expires_in"] = self.expires_in
            data = json.dumps(payload).encode()
        elif mode == "status":
            status, data = self.status, b'{"error": "invalid_client"}'
        elif mode == "garbage":
            data = b"{not json"
        elif mode == "list":
            data = b'["access_token", "x"]'
        elif mode == "no_token":
            data = b'{"token_type": "Bearer", "expires_in": 60}'
        elif mode == "huge":
            data = json.dumps({"access_token": "x" * (1024 * 1024)}).encode()
        elif mode == "html":
            content_type, data = "text/html", b"<html><body>login</body></html>"
        elif mode == "drip":
            data = json.dumps({"access_token": "drip", "token_type": "Bearer"}).encode()
        else:
            raise AssertionError(mode)
        head = (f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(data)}\r\n\r\n").encode()
        writer.write(head)
        if mode == "drip":
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.5)
        else:
            writer.write(data)
        await writer.drain()
        return True


class ThreadedTokenEndpoint:
    """Run a TokenEndpoint on its own event loop in a thread (for subprocess sidecars)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.endpoint = TokenEndpoint(host=host)

    def __enter__(self) -> TokenEndpoint:
        self._thread = LoopThread()
        self._thread.run(self.endpoint.start())
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        self._thread.run(self.endpoint.stop())
        self._thread.close()
