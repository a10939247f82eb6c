"""Free loopback ports for the demo, the tests and the benchmarks."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A port p free now with p .. p+span-1, below the kernel's ephemeral range, never
    handed out twice by this process.

    A port from bind(0) is an ephemeral one: released, it can be taken by any outgoing
    connection (Envoy's, a client's, the sidecar's to its token endpoint) before the process
    meant to listen on it binds, and that process then fails with "Address already in use".
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randint(max(1024, low - 12000), low - span)
        block = range(port, port + span)
        if _HANDED_OUT.intersection(block) or not all(map(_bindable, block)):
            continue
        _HANDED_OUT.update(block)
        return port
    raise RuntimeError("no free port below the ephemeral range")
