"""The registry: the servers a caller may see, as JSON (pure, no I/O).

A caller's registry is built from the servers it may see and nothing else, so that it is
byte for byte the registry of a gateway configured without the servers hidden from it: no
count, index or order that a hidden server could shift. Servers keep their config order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .config import ServerSettings
from .routing import ServerAddress


def entry(name: str, server: ServerSettings, address: ServerAddress) -> dict[str, str]:
    """What the registry says of one server: its name, title, description and where it is."""
    listed = {"name": name}
    if server.title is not None:
        listed["title"] = server.title
    if server.description is not None:
        listed["description"] = server.description
    if address.path is not None:
        listed["path"] = address.path
    else:
        listed["host"] = address.host
    return listed


def registry_body(entries: Iterable[Mapping[str, str]]) -> bytes:
    """The registry answer for the servers a caller sees, in config order."""
    return json.dumps({"servers": [dict(listed) for listed in entries]}, ensure_ascii=False,
                      separators=(",", ":")).encode()
