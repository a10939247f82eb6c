"""The credentials settings: the token cache's (`tokens`), a server's client credentials
(`oauth2`) and its token exchange (`token_exchange`)."""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, StrictBool, field_validator, model_validator

from .base import FrozenModel, PositiveSeconds, in_file_only


class TokenSettings(FrozenModel):
    expiry_buffer_s: Annotated[float, Field(ge=0, le=86400)] = 60
    min_ttl_s: PositiveSeconds = 10
    default_ttl_s: PositiveSeconds = 300
    # One token request; Envoy's ext_authz waits this long plus 0.5 s.
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 5
    retry_initial_s: PositiveSeconds = 1
    retry_max_s: PositiveSeconds = 60


class OAuth2Settings(FrozenModel):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    # RFC 7523 client authentication (auth_method private_key_jwt): a JWT assertion signed
    # with this key (PEM; RSA signs RS256, EC P-256 ES256), never a secret on the wire.
    private_key_file: Path | None = None
    key_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # its `kid`
    # What load_config read in private_key_file: not a key of the config, never dumped.
    private_key: SecretStr | None = Field(default=None, exclude=True)
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] = (
        "client_secret_basic")

    _key_in_file = model_validator(mode="before")(in_file_only("private_key",
                                                                "the private key"))

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        match = re.match(r"^https?://([^/?#\s]+)", value)
        if not match:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if "@" in match.group(1):
            raise ValueError("must not carry credentials; use client_id and client_secret")
        return value

    @property
    def display_url(self) -> str:
        """The token URL without its query string, fit for logs and error messages."""
        return self.token_url.split("?", 1)[0].split("#", 1)[0]

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scope in value:
            if not scope or any(c.isspace() for c in scope):
                raise ValueError(f"scope {scope!r} must be non-empty and contain no spaces")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> OAuth2Settings:
        has_secret = self.client_secret is not None or self.client_secret_file is not None
        if self.auth_method == "private_key_jwt":
            if self.private_key_file is None:
                raise ValueError("auth_method private_key_jwt needs private_key_file")
            if has_secret:
                raise ValueError("auth_method private_key_jwt signs with private_key_file:"
                                 " set no client_secret nor client_secret_file")
            return self
        if self.private_key_file is not None or self.key_id is not None:
            raise ValueError("private_key_file and key_id are for auth_method"
                             " private_key_jwt")
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret and client_secret_file")
        if self.client_secret is not None and not self.client_secret.get_secret_value():
            raise ValueError("client_secret is empty")
        return self

    @property
    def credential_file(self) -> Path | None:
        """The file load_config reads the credential from (a secret, or a private key)."""
        return self.private_key_file or self.client_secret_file

    def secret(self) -> str:
        """Return the client secret, or the private key's PEM for private_key_jwt (the file
        has been read at load time)."""
        held = self.private_key if self.auth_method == "private_key_jwt" else self.client_secret
        assert held is not None, "load_config reads client_secret_file and private_key_file"
        return held.get_secret_value()

    @cached_property
    def cache_key(self) -> tuple[str, ...]:
        """Identify a credential without holding its secret: a rotated secret is a new key."""
        digest = hashlib.sha256(self.secret().encode()).hexdigest()
        return (
            self.token_url,
            self.client_id,
            digest,
            self.auth_method,
            self.key_id or "",
            " ".join(self.scopes),
            self.audience or "",
            self.resource or "",
        )


ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class TokenExchangeSettings(OAuth2Settings):
    """RFC 8693 token exchange: the caller's own token (as Envoy verified it) exchanged for
    one to send upstream, per subject. The client authenticates as for client credentials;
    audience, resource and scopes go as RFC 8693's `audience`, `resource` and `scope`."""

    # Where the subject token comes from: the caller's bearer, as the `jwt` settings have
    # Envoy verify it (jwt_authn). A token Envoy did not verify is never exchanged.
    subject_token: Literal["jwt"] = "jwt"
    # Send the gateway's own client-credentials token (this client's, with no scope,
    # audience nor resource) as the actor: delegation, where the IdP wants to know who acts.
    actor_token: StrictBool = False
    requested_token_type: str = ACCESS_TOKEN_TYPE

    @cached_property
    def exchange_parts(self) -> tuple[str, ...]:
        """What, with the subject, names an exchanged token: the client (its secret by
        digest), the endpoint, what is asked for. A change to any is a new token."""
        return (*self.cache_key, self.requested_token_type, str(self.actor_token))

    @cached_property
    def actor(self) -> OAuth2Settings | None:
        """The client-credentials settings of the actor token (None without actor_token)."""
        if not self.actor_token:
            return None
        return OAuth2Settings.model_validate(self.model_dump(
            include=set(OAuth2Settings.model_fields) - {"scopes", "audience", "resource"},
        )).model_copy(update={"private_key": self.private_key})
