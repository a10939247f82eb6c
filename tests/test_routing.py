"""Which server a request targets."""

from __future__ import annotations

import pytest

from ext_authz.policy.config import RoutingSettings
from ext_authz.policy.routing import origin, route

DEFAULT = RoutingSettings()
HOSTS = RoutingSettings(path_prefix=None, host_suffix=".mcp.example.com")


@pytest.mark.parametrize(
    ("settings", "extensions", "path", "authority", "name", "source"),
    [
        (DEFAULT, {"mcp_server": "a"}, "/mcp/b", "", "a", "context_extension"),
        (DEFAULT, {"mcp_server": ""}, "/mcp/b", "", "", "context_extension"),
        (DEFAULT, {"other": "a"}, "/mcp/b", "", "b", "path"),
        (DEFAULT, {}, "/mcp/github", "", "github", "path"),
        (DEFAULT, {}, "/mcp/github/", "", "github", "path"),
        (DEFAULT, {}, "/mcp/github/messages/1", "", "github", "path"),
        (DEFAULT, {}, "/mcp/github?session=1", "", "github", "path"),
        (DEFAULT, {}, "/mcp/github#x", "", "github", "path"),
        (DEFAULT, {}, "/mcp/github;param", "", "github", "path"),
        (DEFAULT, {}, "/mcp/", "", None, "none"),
        (DEFAULT, {}, "/mcp//github", "", None, "none"),
        (DEFAULT, {}, "/mcp", "", None, "none"),
        (DEFAULT, {}, "/other/github", "", None, "none"),
        (DEFAULT, {}, "/MCP/github", "", None, "none"),
        (HOSTS, {}, "/", "github.mcp.example.com", "github", "host"),
        (HOSTS, {}, "/", "GitHub.MCP.example.com:8443", "github", "host"),
        (HOSTS, {}, "/", ".mcp.example.com", None, "none"),
        (HOSTS, {}, "/", "github.example.com", None, "none"),
        (HOSTS, {}, "/", "[::1]:80", None, "none"),
        (RoutingSettings(host_suffix=".m.io"), {}, "/mcp/a", "b.m.io", "a", "path"),
        (RoutingSettings(host_suffix=".m.io"), {}, "/x", "b.m.io", "b", "host"),
        (RoutingSettings(context_extension_key="srv"), {"srv": "z"}, "/mcp/a", "", "z",
         "context_extension"),
    ],
)
def test_route(settings: RoutingSettings, extensions: dict[str, str], path: str,
               authority: str, name: str | None, source: str) -> None:
    """Context extension first (authoritative), then path prefix, then host suffix."""
    found = route(settings, extensions, path, authority)
    assert (found.name, found.source) == (name, source)


@pytest.mark.parametrize(("authority", "forwarded", "scheme", "expected"), [
    ("gw.example:8080", "", "http", "http://gw.example:8080"),
    ("gw.example", "https", "http", "https://gw.example"),
    ("gw.example", "HTTPS, http", "", "https://gw.example"),
    ("[2001:db8::1]:443", "", "https", "https://[2001:db8::1]:443"),
    ("gw.example", "", "", "http://gw.example"),
    ("gw.example", "ftp", "http", None),  # no scheme a URL of ours may have
    ("gw%2eexample", "", "http", None),  # another host, percent-encoded
    ("user@gw", "", "http", None),  # userinfo: another host
    ("a,b", "", "http", None),  # a list, and a comma in a header parameter
    ('gw"x', "", "http", None),  # would close a quoted parameter
    ("gw example", "", "http", None),
    ("", "", "http", None),
    ("g" * 256, "", "http", None),  # longer than any host
])
def test_origin(authority: str, forwarded: str, scheme: str, expected: str | None) -> None:
    """The gateway URL's origin as the caller addressed it, or None where it cannot be said."""
    assert origin(authority, forwarded, scheme) == expected
