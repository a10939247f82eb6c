"""The challenge filter (Lua): an upstream's 401 names the gateway's metadata URL.

An upstream that wants the caller's own token answers 401 with a challenge naming its
metadata URL (RFC 9728 section 5.1), which a client behind the gateway cannot use: the URL
becomes the gateway's, from the origin the caller used (its Host and X-Forwarded-Proto,
read as the sidecar reads them for the discovery document) and the route's metadata
path. Every other parameter of the challenge stays. Without an origin, the upstream's URL
is dropped rather than shown. The script is `challenge.lua`, beside this file.
"""

from __future__ import annotations

from importlib import resources

from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Struct

from ...contract import CHALLENGE_FILTER, CHALLENGE_METADATA_PATH, PROTECTED_RESOURCE
from ...policy.routing import ServerAddress

_SCRIPT = "challenge"


def source() -> str:
    """The Lua script, as shipped with the package."""
    return resources.files(__package__).joinpath("challenge.lua").read_text()


def http_filter() -> HttpFilter:
    """The filter, off unless a route turns it on."""
    return HttpFilter(name=CHALLENGE_FILTER, disabled=True, typed_config=AnyMessage.pack(
        Lua(source_codes={_SCRIPT: DataSource(inline_string=source())})))


def per_route() -> AnyMessage:
    """Turn the filter on for a route."""
    return AnyMessage.pack(LuaPerRoute(name=_SCRIPT))


def route_mark(address: ServerAddress) -> Struct:
    """Where the filter points a client: the server's metadata at the gateway."""
    mark: Struct = Struct.from_dict(
        {CHALLENGE_METADATA_PATH: PROTECTED_RESOURCE + (address.path or "")})
    return mark
