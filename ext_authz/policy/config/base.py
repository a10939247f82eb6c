"""The base of every settings model, and the addresses settings name."""

from __future__ import annotations

import functools
import ipaddress
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

# Upper bounds say what is sane, and keep every derived Envoy timeout one Envoy accepts.
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Self:
        """A copy, with nothing derived from the old values: pydantic copies the instance's
        dict, cached properties included, so a secret read into a copy (load_config's
        files) would otherwise keep the cache key and actor of the secret before it."""
        copied = super().model_copy(update=update, deep=deep)
        for name in _cached(type(self)):
            copied.__dict__.pop(name, None)
        return copied


@functools.cache
def _cached(model: type) -> tuple[str, ...]:
    return tuple(name for klass in model.__mro__ for name, value in vars(klass).items()
                 if isinstance(value, functools.cached_property))


def in_file_only(key: str, what: str) -> Callable[[type, Any], Any]:
    """A before-validator refusing `key` written in the config: `what` is given in a file
    (`KEY_file`), which load_config reads into it."""
    def refuse(cls: type, data: Any) -> Any:
        if isinstance(data, dict) and key in data:
            raise ValueError(f"give {what} in a file, as {key}_file")
        return data
    return classmethod(refuse)  # type: ignore[return-value]


def split_listen(listen: str) -> tuple[str, int]:
    """Split a validated `host:port` listen address (brackets kept on IPv6 hosts)."""
    host, _, port = listen.rpartition(":")
    return host, int(port)


def parse_listen(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"give host:port (e.g. 127.0.0.1:{value}), not a bare port: the host"
                         " says who can reach it")
    if not isinstance(value, str):
        raise ValueError("must be host:port or unix:/path")
    if value.startswith("unix:"):
        if len(value) <= len("unix:"):
            raise ValueError("unix: needs a path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port or unix:/path")
    return value


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    """Where an MCP server listens: `host:port`, or a URL `http(s)://host[:port][/path]`.

    A URL names the server's MCP endpoint: its path replaces the gateway's `/mcp/NAME` (no
    path: `/`), and `https` means TLS with SNI. `host:port` is plain HTTP, the gateway's path
    forwarded unchanged.
    """

    host: str
    port: int
    scheme: Literal["http", "https"] | None = None  # None: given as host:port
    path: str | None = None  # the MCP endpoint's path (URLs only)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @classmethod
    def parse(cls, text: str) -> UpstreamAddress:
        """Parse `host:port` or an http(s) URL; ValueError saying what is wrong."""
        if "://" not in text:
            host, sep, port = text.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{text!r} is not host:port nor an http(s):// URL")
            return cls(host.strip("[]"), int(port))
        url = urllib.parse.urlsplit(text)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"{text!r}: only http:// and https:// upstreams are supported")
        if url.username is not None or url.password is not None:
            raise ValueError(f"{text!r} must not carry credentials (oauth2 injects them)")
        if url.query or url.fragment:
            raise ValueError(f"{text!r} must not have a query or a fragment")
        try:
            given: int | None = url.port
        except ValueError:
            raise ValueError(f"{text!r} has a port that is not a number from 1 to 65535"
                             ) from None
        if not url.hostname:
            raise ValueError(f"{text!r} has no host")
        if given == 0:
            raise ValueError(f"{text!r} has port 0")
        scheme: Literal["http", "https"] = "https" if url.scheme == "https" else "http"
        return cls(url.hostname, given or (443 if scheme == "https" else 80), scheme,
                   url.path or "/")
