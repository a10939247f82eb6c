"""HTTP/1.1 on a socket, byte for byte: what a client library would normalize (header case,
Host, the moment the body goes) is the test's to choose. Shared by the e2e and topology
suites."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    """An HTTP/1.1 response as bytes on the wire, and parsed."""

    raw: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(method: str, target: str, host: str | None,
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes, exactly as given (None: no Host header at all)."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        raise ValueError(f"not an HTTP/1.1 response: {raw[:200]!r}")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
    return RawResponse(raw, int(lines[0].split()[1]), headers,
                       body if length is None else body[:length])


def raw_exchange(host: str, port: int, request: bytes, timeout: float = 10, *,
                 source: str | None = None, later: bytes = b"", pause_s: float = 0.0
                 ) -> RawResponse:
    """Send bytes as they are (no client library normalizing them), from `source` if given,
    and `later` after `pause_s`; read until the answer is whole or the connection closes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(request)
        if later:
            time.sleep(pause_s)
            sock.sendall(later)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            response = b"".join(chunks)
            if _complete(response):
                break
    return parse_response(b"".join(chunks))


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False
