"""The demo's check that its ports are free (ext_authz.demo.busy_port)."""

from __future__ import annotations

import socket
from dataclasses import replace

from ext_authz.demo import DemoPorts, busy_port


def _ports_at(port: int) -> DemoPorts:
    free = DemoPorts.from_base(0)
    return replace(free, envoy=port)


def test_a_listening_port_is_busy() -> None:
    """A port someone listens on is named, with what the demo wanted it for."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert busy_port(_ports_at(port)) == f"{port} (envoy)"


def test_a_port_in_time_wait_is_free() -> None:
    """A port whose last connection is in TIME_WAIT (a demo just stopped) is not refused."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first holds TIME_WAIT: the listening port's
        client.close()
    with socket.socket() as probe:  # the port is really in TIME_WAIT: a plain bind fails
        try:
            probe.bind(("127.0.0.1", port))
            in_time_wait = False
        except OSError:
            in_time_wait = True
    assert in_time_wait
    assert busy_port(_ports_at(port)) is None
