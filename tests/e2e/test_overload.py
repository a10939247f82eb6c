"""Envoy's downstream connection limit (the overload manager envoy-config renders), through
a real Envoy in both data paths: past it, a new connection gets nothing until one closes."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from ext_authz.render.options import DATA_PATHS
from tests.e2e.harness import Process, start_gateway, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LIST = '{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def answered(base: str) -> bool:
    """Whether a new connection gets an answer (any: 404 for an unknown server)."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1"),
                          timeout=2) as http:
            return http.post(f"{base}/mcp/nope", content=LIST, headers=HEADERS).status_code == 404
    except httpx.HTTPError:  # closed, or never answered
        return False


def closed(connection: socket.socket) -> bool:
    """Whether the other end has closed an idle connection (nothing to read but its end)."""
    connection.setblocking(False)
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    finally:
        connection.setblocking(True)


@pytest.mark.parametrize("data_path", DATA_PATHS)
def test_past_the_limit_no_connection_is_served(tmp_path: Path, data_path: str) -> None:
    processes: list[Process] = []
    try:
        base = start_gateway({"pub": {"upstream": "127.0.0.1:1"}}, tmp_path, data_path, processes,
                             envoy_flags=("--max-connections", "3"))
        envoy_log = processes[-1].output()
        assert "no configured limit to the number of allowed active downstream" not in (
            envoy_log)
        assert answered(base)
        host, _, port = base.removeprefix("http://").rpartition(":")
        held: list[socket.socket] = []

        def full_and_refused() -> bool:
            # Three held open (a listener pushed over xDS drains the old one's idle
            # connections: those are replaced), and then a fourth is not served.
            for connection in [c for c in held if closed(c)]:
                held.remove(connection)
                connection.close()
            while len(held) < 3:
                held.append(socket.create_connection((host, int(port)), timeout=5))
            return not answered(base)

        try:
            until(full_and_refused, timeout=15)
        finally:
            for connection in held:
                connection.close()
        until(lambda: answered(base), timeout=15)  # and back once they close
    finally:
        for process in reversed(processes):
            process.stop()
