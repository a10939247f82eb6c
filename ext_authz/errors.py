"""Exceptions raised by mcp-ext-authz.

    ExtAuthzError
    ├── ConfigError               a config file that cannot be served (each problem names its key)
    └── TokenError                no upstream credential could be obtained for a server
        ├── TokenEndpointError    the token endpoint could not be reached, timed out or errored
        ├── TokenResponseError    the token endpoint answered with something that is not a token
        └── TokenDeadlineError    the check's deadline ran out before a token arrived

Messages name the server, the URL and the HTTP status; never a secret or a token.
"""

from __future__ import annotations


class ExtAuthzError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ExtAuthzError):
    """A config that cannot be served; `problems` lists `key.path: what is wrong`."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class TokenError(ExtAuthzError):
    """No token could be had for a server."""

    def __init__(self, server: str, message: str) -> None:
        self.server = server
        super().__init__(f"server {server!r}: {message}")


class TokenEndpointError(TokenError):
    """The token endpoint was unreachable, too slow, or answered with an error status.
    `code`: the OAuth error code it gave ("" if none)."""

    def __init__(self, server: str, message: str, code: str = "") -> None:
        self.code = code
        super().__init__(server, message)


class CredentialsRefusedError(TokenEndpointError):
    """The token endpoint refused the client's credentials (a wrong secret, an unknown or
    unauthorized client), or a grant it was shown: retrying soon will not help, a change of
    config or at the IdP will."""


class SubjectRefusedError(TokenError):
    """A caller's token cannot be exchanged (RFC 8693): it has expired, or the IdP refused
    it. The caller's to fix (a 401), where any other TokenError is the IdP's (a 503)."""


class TokenResponseError(TokenError):
    """The token endpoint answered 2xx with a body that does not hold a usable bearer token."""


class TokenDeadlineError(TokenError):
    """The check's remaining deadline ran out before a token fetch finished."""
