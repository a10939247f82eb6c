"""A real RFC 8693 authorization server for the tests (Authlib's AuthorizationServer with a
token-exchange grant registered), and a resource server that takes its tokens.

The IdP authenticates clients as Authlib does (client_secret_basic; RFC 7523
private_key_jwt, its assertions checked and their jti used once), issues client-credentials
tokens (the gateway's actor token) and exchanges a user's JWT, verified against the login
issuer's JWKS (the one Envoy's jwt_authn uses), for an ES256 access token (RFC 9068
`at+jwt`) that names the user (`sub`), the audience asked for and the actor (`act`). It
counts exchanges per user, and can be stopped and started again on its port (down).

The resource server is an upstream that checks those tokens: a token the IdP revoked gets
401 with a challenge of its own; every Authorization it saw is kept (its log).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs

from authlib.oauth2 import AuthorizationServer, OAuth2Request
from authlib.oauth2.rfc6749 import ClientMixin, OAuth2Payload
from authlib.oauth2.rfc6749.errors import InvalidRequestError, UnauthorizedClientError
from authlib.oauth2.rfc6749.grants import BaseGrant, ClientCredentialsGrant, TokenEndpointMixin
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ISSUER = "https://idp.test.local"


class _Served:
    """An HTTP server on a loopback port of its own, on a thread; stop() closes the port."""

    port = 0
    _http: ThreadingHTTPServer | None = None

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    @property
    def up(self) -> bool:
        return self._http is not None

    def stop(self) -> None:
        """Down: the port refuses connections until served again."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    auth_method: str  # client_secret_basic or private_key_jwt
    secret: str = ""
    public_key: dict[str, Any] | None = None  # a JWK, for private_key_jwt

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.secret) and secrets.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("client_credentials", EXCHANGE)

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, form: dict[str, str]) -> None:
        self._form = form

    @property
    def data(self) -> dict[str, str]:
        return self._form

    @property
    def datalist(self) -> dict[str, list[str]]:
        return {key: [value] for key, value in self._form.items()}


class _Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, uri: str, headers: Any, form: dict[str, str]) -> None:
        super().__init__("POST", uri, headers=headers)
        self._form = form
        self.payload = _Payload(form)

    @property
    def args(self) -> dict[str, str]:
        return {}

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _Assertion(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 client authentication, as the IdP checks it."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, idp: IdP) -> None:
        super().__init__()
        self.idp = idp

    def get_audiences(self) -> list[str]:
        return [self.idp.token_url]

    def validate_jti(self, claims: Any, jti: str) -> bool:
        if jti in self.idp.jtis:
            return False
        self.idp.jtis.add(jti)
        return True

    def resolve_client_public_key(self, client: Client) -> dict[str, Any] | None:
        return client.public_key


class _ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "private_key_jwt"]


class _TokenExchange(BaseGrant, TokenEndpointMixin):  # type: ignore[misc]
    """RFC 8693: a user's JWT (the login issuer's, unexpired, for the gateway) for a token
    that names the user, the audience asked for and, given an actor token of this IdP's,
    the actor."""

    GRANT_TYPE = EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "private_key_jwt"]

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError()
        idp: IdP = self.server
        form = self.request.form
        if form.get("subject_token_type") != JWT_TYPE or not form.get("subject_token"):
            raise InvalidRequestError("a subject_token of type jwt is required")
        try:
            verified = jwt.decode(form["subject_token"], idp.users)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": idp.users_issuer},
                aud={"essential": True, "value": idp.users_audience},
                exp={"essential": True}, sub={"essential": True}).validate(verified.claims)
        except (JoseError, ValueError) as exc:
            raise InvalidRequestError(f"subject_token: {exc}") from None
        user = {"sub": verified.claims["sub"], "client_id": client.client_id,
                "aud": form.get("audience") or form.get("resource") or ISSUER}
        actor = form.get("actor_token")
        if actor is not None:
            if form.get("actor_token_type") != ACCESS_TOKEN_TYPE:
                raise InvalidRequestError("actor_token_type must be access_token")
            if actor not in idp.actor_tokens:
                raise InvalidRequestError("actor_token: not one this IdP issued")
            user["act"] = {"sub": idp.actor_tokens[actor]}
        self.request.client = client
        self.request.user = user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        idp: IdP = self.server
        user = self.request.user
        with idp.lock:
            idp.exchanges[user["sub"]] += 1
            idp.auth_methods.append(self.request.auth_method)
            idp.actors.append(user.get("act"))
        token = self.generate_token(user=user, scope=self.request.form.get("scope"),
                                    include_refresh_token=False)
        token["issued_token_type"] = ACCESS_TOKEN_TYPE
        return 200, token, self.TOKEN_RESPONSE_HEADER


class IdP(AuthorizationServer, _Served):  # type: ignore[misc]
    """The authorization server: Authlib does the client authentication, the grants'
    checks, the error answers; this class is the HTTP edge and the bookkeeping."""

    def __init__(self, users: dict[str, Any], users_issuer: str, users_audience: str,
                 clients: list[Client], lifetime_s: int = 300) -> None:
        super().__init__()
        self.users = KeySet.import_key_set(users)
        self.users_issuer, self.users_audience = users_issuer, users_audience
        self.clients = {client.client_id: client for client in clients}
        self.key = ECKey.generate_key("P-256", parameters={"kid": "idp"})
        self.lifetime_s = lifetime_s
        self.lock = threading.Lock()
        self.exchanges: Counter[str] = Counter()
        self.auth_methods: list[str] = []
        self.actors: list[Any] = []
        self.actor_tokens: dict[str, str] = {}  # client-credentials token -> client
        self.revoked: set[str] = set()
        self.jtis: set[str] = set()
        self.token_url = ""
        self.register_client_auth_method(_Assertion.CLIENT_AUTH_METHOD, _Assertion(self))
        self.register_grant(_ClientCredentials)
        self.register_grant(_TokenExchange)
        self.register_token_generator("default", BearerTokenGenerator(
            self._access_token, expires_generator=lambda client, grant: self.lifetime_s))

    # -- Authlib's integration points --------------------------------------------------

    def query_client(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        if request.payload.grant_type == "client_credentials":
            self.actor_tokens[token["access_token"]] = request.client.client_id

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]
                        ) -> tuple[int, bytes, list[tuple[str, str]]]:
        return status, json.dumps(body).encode(), list(headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def _access_token(self, client: Client, grant_type: str, user: dict[str, Any] | None,
                      scope: str | None) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "iat": now, "exp": now + self.lifetime_s,
                  "jti": secrets.token_urlsafe(8), "client_id": client.client_id,
                  **({"sub": client.client_id, "aud": ISSUER} if user is None else user)}
        if scope:
            claims["scope"] = scope
        return jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": "idp"}, claims, self.key,
                          algorithms=["ES256"])

    def verify(self, token: str) -> dict[str, Any]:
        """A token of this IdP's, its claims (a JoseError if it is not, or has expired)."""
        claims = jwt.decode(token, self.key, algorithms=["ES256"]).claims
        jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER},
                              exp={"essential": True}).validate(claims)
        return dict(claims)

    # -- HTTP ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> IdP:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                form = {key: values[0] for key, values in raw.items()}
                # The header map as http.server has it: case-insensitive, as Authlib reads.
                request = _Request(idp.token_url, self.headers, form)
                status, body, headers = idp.create_token_response(request)
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)
        self.token_url = f"{self.url}/token"
        return self


@dataclass
class ResourceServer(_Served):
    """An upstream that takes the IdP's tokens: 200 with the token's claims, 401 with its
    own challenge for a token revoked or not the IdP's. `seen`: every Authorization."""

    idp: IdP
    seen: list[str] = field(default_factory=list)

    def start(self) -> ResourceServer:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                authorization = self.headers.get("authorization") or ""
                upstream.seen.append(authorization)
                token = authorization.removeprefix("Bearer ")
                try:
                    claims = upstream.idp.verify(token)
                    if token in upstream.idp.revoked:
                        raise ValueError("revoked")
                    status, body = 200, json.dumps(claims).encode()
                except (JoseError, ValueError):
                    status, body = 401, b'{"error":"invalid_token"}'
                self.send_response(status)
                if status == 401:
                    self.send_header("www-authenticate", 'Bearer error="invalid_token",'
                                     ' resource_metadata="http://upstream.internal/.well-known/'
                                     'oauth-protected-resource"')
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)
        return self
