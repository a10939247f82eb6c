"""Networks: internal ranges, trusted proxies, named networks of CIDRs and identities, and
the JWT provider whose claims identities name."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..network import EXTERNAL, INTERNAL, IdentityRule, IPNetwork
from .base import FrozenModel, UpstreamAddress

DEFAULT_INTERNAL_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)

NETWORK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def _parse_cidr(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a CIDR string")
    try:
        # strict=True: 10.0.0.1/8 would otherwise silently become 10.0.0.0/8; say so instead.
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid CIDR ({exc})") from None


# One CIDR of a list: an error names its index (`network.internal_ranges[1]`).
CIDR = Annotated[IPNetwork, BeforeValidator(_parse_cidr)]

# A SPIFFE ID (spiffe://trust-domain/path); `*` is allowed only as a whole last segment.
_SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()+,;=:@%-]+)*$")
CLAIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.-]{0,127}$")


def _principal(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a SPIFFE ID string")
    pattern = value[:-2] if value.endswith("/*") else value
    if "*" in pattern:
        raise ValueError(f"{value!r}: '*' may stand only for a whole last path segment, as"
                         " in spiffe://td/ns/NS/sa/*")
    if not _SPIFFE_ID.match(pattern):
        raise ValueError(f"{value!r} is not a SPIFFE ID (spiffe://trust-domain/path, the"
                         " trust domain in lower case)")
    return value

SpiffePattern = Annotated[str, BeforeValidator(_principal)]


class NetworkDefinition(FrozenModel):
    """A named network: a caller belongs when any CIDR, principal or claim matches.

    Written as a list, it is CIDRs alone (as before identities existed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    cidrs: tuple[CIDR, ...] = ()
    principals: tuple[SpiffePattern, ...] = ()
    # A claim of a JWT Envoy verified -> the values that place a caller here: equal to a
    # string claim, or a member of an array claim.
    jwt_claims: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, list | tuple):
            return {"cidrs": data}
        if isinstance(data, str):
            raise ValueError(f"write a network as a list of CIDRs ([{data}]), or a mapping of"
                             " cidrs, principals and jwt_claims")
        if isinstance(data, dict) and isinstance(data.get("jwt_claims"), dict):
            data = {**data, "jwt_claims": {
                k: [v] if isinstance(v, str) else v for k, v in data["jwt_claims"].items()}}
        return data

    @field_validator("jwt_claims")
    @classmethod
    def _claims(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for name, values in value.items():
            if not CLAIM_NAME.match(name):
                raise ValueError(f"claim name {name!r} must be a letter or '_' then letters,"
                                 " digits, '_', ':', '.' or '-'")
            if not values or any(not v for v in values):
                raise ValueError(f"claim {name!r}: give one or more non-empty values")
        return value

    @model_validator(mode="after")
    def _something(self) -> NetworkDefinition:
        if not (self.cidrs or self.principals or self.jwt_claims):
            raise ValueError("a network needs cidrs, principals or jwt_claims")
        return self

    @property
    def identity(self) -> IdentityRule:
        return IdentityRule.of(self.principals, self.jwt_claims)


class JwtSettings(FrozenModel):
    """The JWT provider Envoy's jwt_authn verifies tokens with (for `jwt_claims` rules)."""

    issuer: Annotated[str, Field(min_length=1)]
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None  # remote JWKS, fetched by Envoy
    jwks_file: str | None = None  # or a JWKS file where Envoy runs
    # Where the token is: `authorization` means "Authorization: Bearer <token>".
    header: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}$")] = "authorization"
    # Envoy's metadata key for the verified payload (Istio's RequestAuthentication uses the
    # issuer).
    payload_in_metadata: Annotated[str, Field(min_length=1, max_length=256)] = "mcp_ext_authz"

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtSettings:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks_uri (fetched by Envoy) and jwks_file")
        if self.jwks_uri is not None:
            if "://" not in self.jwks_uri:
                raise ValueError(f"jwks_uri {self.jwks_uri!r} must be an http(s):// URL")
            UpstreamAddress.parse(self.jwks_uri)
        return self


class NetworkSettings(FrozenModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    internal_ranges: tuple[CIDR, ...] = Field(
        default_factory=lambda: tuple(_parse_cidr(c) for c in DEFAULT_INTERNAL_RANGES)
    )
    trusted_proxies: tuple[CIDR, ...] = ()
    # Named networks beyond `internal` (which is internal_ranges), for servers' visible_to.
    networks: dict[str, NetworkDefinition] = Field(default_factory=dict)
    # Bounds on what one CheckRequest can make the sidecar read; beyond them it fails closed.
    max_xff_entries: Annotated[int, Field(ge=1, le=1000)] = 32
    max_xff_bytes: Annotated[int, Field(ge=64, le=1_048_576)] = 8192

    @field_validator("networks")
    @classmethod
    def _named(cls, value: dict[str, NetworkDefinition]) -> dict[str, NetworkDefinition]:
        for name in value:
            if name in (INTERNAL, EXTERNAL):
                raise ValueError(f"{name!r} is a built-in network name"
                                 " (internal is network.internal_ranges)")
            if not NETWORK_NAME.match(name):
                raise ValueError(f"network name {name!r} must be a letter then up to 62"
                                 " letters, digits, '_' or '-'")
        return value

    def named(self) -> list[tuple[str, tuple[IPNetwork, ...]]]:
        """Every named network's CIDRs, `internal` first, then in config order."""
        return [(INTERNAL, self.internal_ranges),
                *((name, network.cidrs) for name, network in self.networks.items())]

    def identities(self) -> list[tuple[str, IdentityRule]]:
        """The networks a caller can be in by who it is, with what says so."""
        return [(name, network.identity) for name, network in self.networks.items()
                if network.principals or network.jwt_claims]

    @property
    def uses_principals(self) -> bool:
        return any(network.principals for network in self.networks.values())

    @property
    def uses_claims(self) -> bool:
        return any(network.jwt_claims for network in self.networks.values())
