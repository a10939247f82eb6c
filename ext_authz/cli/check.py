"""`check`: dry-run one decision, through the same steps as a live request, as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..edges.pipeline import Exchange, judge
from ..edges.subject import NoSubject, subject_of, token_payload
from ..errors import TokenError
from ..mcp.jsonrpc import Body, body_headers, request_body
from ..policy.compile import Policy
from ..policy.config import Config, OAuth2Settings, TokenExchangeSettings
from ..policy.decision import Decision, RequestFacts
from ..policy.explain import check_report
from ..policy.network import Identity, claims_payload, identity_from_claims
from ..policy.subject import Subject
from .common import CONFIG_HELP, EXIT_FAILED, EXIT_OK, Commands, UsageError, load


def _context_extensions(pairs: Sequence[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--context-extension {pair!r}: expected key=value")
        result[key] = value
    return result


async def _judge(config: Config, policy: Policy, facts: RequestFacts, body: Body,
                 fetch_token: bool, subject_token: str | None
                 ) -> tuple[Decision, dict[str, Any] | None]:
    """The live path's steps, as envoy-config's config takes them: the server from the
    headers (ext_authz), the token (fetched, or the caller's exchanged), then the tool rules
    from the body (ext_proc, which can send a hidden tool's call on under a fresh name for
    the server to answer). The decision, and a report of the token's steps (with
    --fetch-token): lengths and lifetimes, never a token."""
    if not fetch_token:
        return (await judge(facts, policy, body=lambda: body, can_rename=True,
                            fetch=None)).decision, None
    from ..exchange import ExchangeCache  # httpx: only for the command that fetches
    from ..tokens import TokenCache

    report: dict[str, Any] = {"fetched": False, "why": "no token would be injected"}
    steps: list[dict[str, Any]] = []
    cache = TokenCache(config.tokens)
    exchanges = ExchangeCache(config.tokens)

    async def fetch(oauth2: OAuth2Settings, server: str) -> str:
        try:
            token, lifetime, note = await cache.fetch_now(oauth2, server)
        except TokenError as exc:
            steps.append({"step": "client_credentials", "error": str(exc)})
            raise
        step = {"step": "client_credentials", "fetched": True, "length": len(token),
                "cache_lifetime_s": lifetime}
        if note:
            step["cadence"] = note
        steps.append(step)
        return token

    def subject() -> Subject:
        if subject_token is None:
            raise NoSubject("no --subject-token given (the caller's token to exchange)")
        payload = token_payload(subject_token)
        if payload is None:
            raise NoSubject("--subject-token: not a JWT whose payload decodes")
        found = subject_of(f"Bearer {subject_token}", payload)
        steps.append({"step": "subject", "issuer": found.issuer, "sub": found.subject,
                      "expires_in_s": round(found.expires_at - time.time(), 1)})
        return found

    async def exchanged(settings: TokenExchangeSettings, server: str, who: Subject,
                        actor: str | None) -> str:
        try:
            token = await exchanges.token(settings, server, who, config.tokens.timeout_s,
                                          actor)
        except TokenError as exc:
            steps.append({"step": "token_exchange", "error": str(exc)})
            raise
        steps.append({"step": "token_exchange", "fetched": True, "length": len(token),
                      "actor_token": actor is not None})
        return token

    try:
        judged = await judge(facts, policy, body=lambda: body, can_rename=True, fetch=fetch,
                             exchange=Exchange(subject, exchanged,
                                               token_given=subject_token is not None))
    finally:
        await cache.aclose()
        await exchanges.aclose()
    if steps:
        last = steps[-1]
        report = {"fetched": "error" not in last, **({"error": last["error"]}
                                                      if "error" in last else {})}
        if len(steps) == 1 and last["step"] == "client_credentials":
            report.update({k: v for k, v in last.items() if k != "step"})
        else:
            report["steps"] = steps
    elif judged.decision.reason == "subject_token_refused":
        report = {"fetched": False, "error": judged.decision.detail}
    return judged.decision, report


def _headers(lines: Sequence[str], body: bool) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise UsageError(f"--header {line!r}: expected 'Name: value'")
        headers.append((name.lower(), value.strip()))
    if body and not any(name == "content-type" for name, _ in headers):
        headers.append(("content-type", "application/json"))  # as every MCP client sends
    return headers


def _read_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        return str(args.body).encode()
    if args.body_file is None:
        return b""
    try:
        return Path(args.body_file).read_bytes()
    except OSError as exc:
        raise UsageError(f"--body-file {args.body_file}: cannot read ({exc.strerror})") from None


def _read_subject_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--subject-token {path}: cannot read ({exc})") from None
    if not token:
        raise UsageError(f"--subject-token {path}: the file is empty")
    return token


def _identity(principal: str, claims_json: str | None, policy: Policy) -> Identity:
    """What Envoy would vouch for: --principal (the mTLS peer's URI SAN) and --jwt-claims
    (a verified JWT's payload), read as the live path reads them."""
    try:
        payload = claims_payload(claims_json)
    except ValueError as exc:
        raise UsageError(f"--jwt-claims: {exc}") from None
    return identity_from_claims(principal, payload, policy.networks.claim_names)


def cmd_check(args: argparse.Namespace) -> int:
    # Without --fetch-token no secret is used, so an unset ${VAR} need not stop a dry run.
    config = load(args.config, secrets=args.fetch_token)
    has_body = args.body is not None or args.body_file is not None
    data = _read_body(args)
    method = args.method or ("POST" if has_body else "GET")
    headers = _headers(args.header, has_body)
    forwarded = [value for name, value in headers if name == "x-forwarded-for"]
    proto = ",".join(value for name, value in headers if name == "x-forwarded-proto")
    body = request_body(data, method, body_headers(headers))
    facts = RequestFacts(
        peer=args.peer,
        x_forwarded_for=args.xff if args.xff is not None else (
            ",".join(forwarded) if forwarded else None),
        path=args.path,
        authority=args.host,
        context_extensions=_context_extensions(args.context_extension),
        method=method,
        identity=_identity(args.principal, args.jwt_claims, policy := Policy.from_config(config)),
        forwarded_proto=proto,
        scheme="http",
    )
    subject_token = _read_subject_token(args.subject_token)
    if subject_token is not None and not args.fetch_token:
        raise UsageError("--subject-token is exchanged only with --fetch-token")
    decision, token = asyncio.run(_judge(config, policy, facts, body, args.fetch_token,
                                         subject_token))
    report = check_report(decision, body)
    if token is not None:
        report["token"] = token
    print(json.dumps(report, indent=2))
    if token is not None and token.get("error"):
        print(f"check: token fetch failed: {token['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if args.exit_code and not decision.allowed else EXIT_OK


def add_parser(commands: Commands) -> None:
    """The `check` command's flags."""
    check = commands.add_parser("check", help="dry-run one decision and print it as JSON")
    check.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
    check.add_argument("--peer", required=True, help="the downstream peer address Envoy saw")
    check.add_argument("--xff", default=None, help='X-Forwarded-For value, e.g. "a, b"')
    check.add_argument("--path", default="/", help="request path (default /)")
    check.add_argument("--host", default="", help=":authority of the request")
    check.add_argument("--context-extension", action="append", default=[], metavar="K=V",
                       help="an Envoy context extension (repeatable)")
    body = check.add_mutually_exclusive_group()
    body.add_argument("--body", default=None, metavar="JSON",
                      help="the request body, e.g. a JSON-RPC tools/call (for tool rules)")
    body.add_argument("--body-file", default=None, metavar="FILE",
                      help="read the request body from a file")
    check.add_argument("--principal", default="", metavar="SPIFFE_ID",
                       help="the mTLS peer certificate's URI SAN, as Envoy reports it")
    check.add_argument("--jwt-claims", default=None, metavar="JSON",
                       help="the payload of a JWT Envoy verified, as a JSON object")
    check.add_argument("--method", default=None,
                       help="HTTP method (default POST with a body, else GET)")
    check.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="a request header, as the client sends it (repeatable), e.g."
                            " Content-Type, Mcp-Method, Mcp-Name, Content-Encoding;"
                            " with a body, Content-Type defaults to application/json")
    check.add_argument("--fetch-token", action="store_true",
                       help="really fetch the token (its length and lifetime are printed,"
                            " never the token); exit 1 if the fetch fails")
    check.add_argument("--subject-token", default=None, metavar="FILE",
                       help="with --fetch-token: the caller's JWT, in FILE, to exchange for a"
                            " token_exchange server (read as Envoy's jwt_authn would pass it;"
                            " its signature is not checked here). Neither token is printed")
    check.add_argument("--exit-code", action="store_true",
                       help="exit 1 when the request would be denied (for scripts)")
    check.set_defaults(func=cmd_check)
