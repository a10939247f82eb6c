"""The token endpoint's wire (RFC 6749): a token request's form and client authentication,
the POST, and its answer read strictly, for every grant the sidecar asks for (client
credentials, token exchange). Errors name the server and the URL, never the body, the
secret nor a token."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from typing import Any
from urllib.parse import quote_plus

import httpx

from .client_assertion import ASSERTION_TYPE, client_assertion
from .errors import CredentialsRefusedError, TokenEndpointError, TokenResponseError
from .policy.config import OAuth2Settings

MAX_RESPONSE_BYTES = 64 * 1024
# RFC 6750 b64token, loosened to any visible ASCII: what can travel in a header value
# without letting a token endpoint smuggle a CR/LF or a second header upstream.
# Matched whole (fullmatch): `$` would also match before a trailing newline.
_HEADER_SAFE_TOKEN = re.compile(r"[\x21-\x7e]+")
_OAUTH_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")
# RFC 6749 5.2: what a token endpoint answers for credentials it will not take.
_REFUSALS = frozenset(("invalid_client", "unauthorized_client", "invalid_grant",
                       "invalid_scope", "access_denied"))


def _form_encode(value: str) -> str:
    # RFC 6749 2.3.1: id and secret are form-urlencoded before they are joined and base64ed.
    return quote_plus(value, safe="")


def build_token_request(settings: OAuth2Settings) -> tuple[dict[str, str], dict[str, str]]:
    """Return (form fields, headers) of a client-credentials token request."""
    form = {"grant_type": "client_credentials"}
    if settings.scopes:
        form["scope"] = " ".join(settings.scopes)
    if settings.audience:
        form["audience"] = settings.audience
    if settings.resource:
        form["resource"] = settings.resource
    return form, client_auth(settings, form)


def _expires_in(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expires_in is a boolean")
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"\d{1,12}(\.\d+)?", value):
            raise ValueError("expires_in is not a number")
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expires_in is not a finite number")
    if value <= 0:
        raise ValueError("expires_in is not positive: the token is already expired")
    return float(value)


def parse_token_response(server: str, status: int, body: bytes) -> tuple[str, float | None]:
    """Return (access_token, expires_in) from a 2xx token response body, or raise.

    Error messages name the server and the HTTP status and describe the body's shape;
    they never quote the body, which may hold a token.
    """
    where = f"token endpoint answered HTTP {status}"
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenResponseError(server, f"{where} with a body that is not JSON") from None
    if not isinstance(payload, dict):
        raise TokenResponseError(server, f"{where} with JSON that is not an object")
    token = payload.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenResponseError(server, f"{where} without an access_token")
    if not _HEADER_SAFE_TOKEN.fullmatch(token):
        raise TokenResponseError(server, f"{where} with an access_token unsafe in a header")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = token_type if isinstance(token_type, str) and len(token_type) < 32 else "?"
        raise TokenResponseError(server, f"{where} with token_type {shown!r}, not Bearer")
    try:
        expires_in = _expires_in(payload.get("expires_in"))
    except ValueError as exc:
        raise TokenResponseError(server, f"{where}: {exc}") from None
    return token, expires_in


def _error_code(body: bytes) -> str:
    """The OAuth error code of an error answer ("" if none, or not one to quote)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    code = payload.get("error") if isinstance(payload, dict) else None
    return code if isinstance(code, str) and _OAUTH_ERROR_CODE.match(code) else ""


def client_auth(settings: OAuth2Settings, form: dict[str, str]) -> dict[str, str]:
    """The headers of a token request, the client authenticated (RFC 6749 2.3.1): HTTP
    Basic, or the id and secret added to `form`, or (RFC 7523) a signed assertion added."""
    headers = {"accept": "application/json", "accept-encoding": "identity"}
    if settings.auth_method == "private_key_jwt":
        form["client_id"] = settings.client_id
        form["client_assertion_type"] = ASSERTION_TYPE
        # The audience is the token endpoint (RFC 7523 3): its URL as configured.
        form["client_assertion"] = client_assertion(settings.secret(), settings.client_id,
                                                    settings.token_url, settings.key_id)
    elif settings.auth_method == "client_secret_basic":
        pair = f"{_form_encode(settings.client_id)}:{_form_encode(settings.secret())}"
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    else:
        form["client_id"] = settings.client_id
        form["client_secret"] = settings.secret()
    return headers


async def post_token_request(client: httpx.AsyncClient, settings: OAuth2Settings,
                             form: dict[str, str], headers: dict[str, str], server: str,
                             timeout_s: float) -> tuple[str, float | None]:
    """POST a token request: (access_token, expires_in), or a TokenError that names the
    server and the URL (never the body, the secret nor a token)."""
    url = settings.display_url
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", settings.token_url, data=form,
                                     headers=headers) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise TokenResponseError(
                            server,
                            f"token endpoint {url} answered HTTP {response.status_code}"
                            f" with a body over {MAX_RESPONSE_BYTES} bytes",
                        )
                status = response.status_code
    except TimeoutError:
        raise TokenEndpointError(
            server, f"token endpoint {url} did not answer within {timeout_s}s") from None
    except httpx.HTTPError as exc:
        raise TokenEndpointError(
            server, f"token endpoint {url} failed: {type(exc).__name__}") from exc
    if not 200 <= status < 300:
        code = _error_code(bytes(body))
        said = f"token endpoint {url} answered HTTP {status}" + (f" ({code})" if code else "")
        if status == 401 or (400 <= status < 500 and code in _REFUSALS):
            raise CredentialsRefusedError(server, f"credentials refused: {said}",
                                          code=code)
        raise TokenEndpointError(server, said, code=code)
    return parse_token_response(server, status, bytes(body))
