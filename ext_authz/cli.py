"""The `mcp-ext-authz` command: serve, check, validate, envoy-config, example-config, demo.

Every mistake a user can type is answered in one line on stderr and a non-zero exit:
2 for a bad config, flag or file, 1 for a failure at run time (a port in use, a failed
token fetch, a denial under `check --exit-code`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .edges.pipeline import judge
from .errors import ConfigError, ExtAuthzError, TokenError
from .mcp.jsonrpc import Body, body_headers, request_body
from .policy.compile import Policy
from .policy.config import (
    EXAMPLE_CONFIG,
    Config,
    OAuth2Settings,
    config_warnings,
    example_config,
    load_config,
)
from .policy.decision import Decision, RequestFacts
from .policy.explain import check_report
from .policy.network import Identity, identity_from_claims

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class UsageError(Exception):
    """A flag or a file named on the command line that cannot be used (exit 2)."""


def _load(path: str | None, *, secrets: bool = True) -> Config:
    config = example_config() if path is None else load_config(path, secrets=secrets)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return config


def _print_config_error(exc: ConfigError) -> None:
    print(f"invalid config {exc.source}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def run_loop(coroutine: Any, loop: str = "auto") -> Any:
    """Run a coroutine on uvloop when installed (or asked for), else on asyncio's loop."""
    if loop != "asyncio":
        try:
            import uvloop  # the `fast` extra: a cheaper event loop (see bench/)
        except ImportError:
            if loop == "uvloop":
                raise UsageError("--loop uvloop: uvloop is not installed") from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coroutine)
    return asyncio.run(coroutine)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.config is None:
        logging.getLogger(__name__).warning(
            "no --config given: serving the built-in example config"
            " (`mcp-ext-authz example-config` prints it)")
    if args.workers > 1:
        from .workers import run_workers

        return run_workers(args.workers, args.config, args.grace, args.log_level, args.loop)

    from .server import Sidecar  # grpc server machinery only for the command that serves

    sidecar = Sidecar(config, Path(args.config) if args.config else None, grace_s=args.grace,
                      worker=args.worker)
    run_loop(sidecar.run(), args.loop)
    return EXIT_OK


def _context_extensions(pairs: Sequence[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--context-extension {pair!r}: expected key=value")
        result[key] = value
    return result


async def _judge(config: Config, policy: Policy, facts: RequestFacts, body: Body,
                 fetch_token: bool) -> tuple[Decision, dict[str, Any] | None]:
    """The live path's steps, as envoy-config's config takes them: the server from the
    headers (ext_authz), the token, then the tool rules from the body (ext_proc, which can
    send a hidden tool's call on under a fresh name for the server to answer). The decision,
    and a report of the token fetch (with --fetch-token)."""
    if not fetch_token:
        decision, _ = await judge(facts, policy, body=lambda: body, can_rename=True, fetch=None)
        return decision, None
    from .tokens import TokenCache  # httpx: only for the command that fetches

    report: dict[str, Any] = {"fetched": False, "why": "no token would be injected"}
    cache = TokenCache(config.tokens)

    async def fetch(oauth2: OAuth2Settings, server: str) -> str:
        try:
            token, lifetime = await cache.fetch_now(oauth2, server)
        except TokenError as exc:
            report.clear()
            report.update({"fetched": False, "error": str(exc)})
            raise
        report.clear()
        report.update({"fetched": True, "length": len(token), "cache_lifetime_s": lifetime})
        return token

    try:
        decision, _ = await judge(facts, policy, body=lambda: body, can_rename=True,
                                  fetch=fetch)
    finally:
        await cache.aclose()
    return decision, report


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


def _identity(principal: str, claims_json: str | None, policy: Policy) -> Identity:
    """What Envoy would vouch for: --principal (the mTLS peer's URI SAN) and --jwt-claims
    (a verified JWT's payload), read as the live path reads them."""
    payload = None
    if claims_json is not None:
        try:
            payload = json.loads(claims_json)
        except ValueError as exc:
            raise UsageError(f"--jwt-claims: not JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise UsageError("--jwt-claims: give a JSON object, the JWT's payload")
    return identity_from_claims(principal, payload, policy.networks.claim_names)


def cmd_check(args: argparse.Namespace) -> int:
    # Without --fetch-token no secret is used, so an unset ${VAR} need not stop a dry run.
    config = _load(args.config, secrets=args.fetch_token)
    has_body = args.body is not None or args.body_file is not None
    data = _read_body(args)
    method = args.method or ("POST" if has_body else "GET")
    headers = _headers(args.header, has_body)
    forwarded = [value for name, value in headers if name == "x-forwarded-for"]
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
    )
    decision, token = asyncio.run(_judge(config, policy, facts, body, args.fetch_token))
    report = check_report(decision, body)
    if token is not None:
        report["token"] = token
    print(json.dumps(report, indent=2))
    if token is not None and token.get("error"):
        print(f"check: token fetch failed: {token['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if args.exit_code and not decision.allowed else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: ok, {len(config.servers)} servers")
    return EXIT_OK


def cmd_example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(EXAMPLE_CONFIG)
    return EXIT_OK


def _default_sidecar_address(config: Config) -> str:
    listen = config.grpc.listen
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    # A wildcard listen address is not an address Envoy can dial.
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '::') else host}:{port}"


def write_atomically(path: str, text: str) -> None:
    """Write a whole file or none: a temporary file beside it, then renamed over it."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"--output {path}: folder {target.parent} does not exist")
    try:
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, target)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write ({exc.strerror})") from None


def _listener_tls(args: argparse.Namespace) -> Any:
    from .render.options import ListenerTLS

    given = (args.listen_cert, args.listen_key, args.client_ca)
    if not any(given):
        return None
    if not all(given):
        raise ValueError("give --listen-cert, --listen-key and --client-ca together (callers"
                         " then present certificates the CA signed)")
    return ListenerTLS(args.listen_cert, args.listen_key, args.client_ca)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from .policy.config import UpstreamAddress
    from .render.bootstrap import build_bootstrap, render
    from .render.options import HostPort, SidecarTLS, Timeouts, parse_sidecar

    # The generator needs no secret: unset ${VAR}s and secret files are never read.
    config = _load(args.config, secrets=False)
    try:
        upstreams = {}
        for pair in args.upstream:
            name, sep, address = pair.partition("=")
            if not sep or not name:
                raise ValueError(f"--upstream {pair!r}: expected NAME=URL or NAME=HOST:PORT")
            try:
                upstreams[name] = UpstreamAddress.parse(address)
            except ValueError as exc:
                raise ValueError(f"--upstream {name}: {exc}") from None
        bootstrap = build_bootstrap(
            config,
            upstreams,
            listen=HostPort.parse(args.listen),
            admin=HostPort.parse(args.admin),
            sidecar=parse_sidecar(args.sidecar or _default_sidecar_address(config)),
            workers=args.workers,
            sidecar_tls=None if args.sidecar_ca is None else SidecarTLS(
                args.sidecar_ca, args.sidecar_cert, args.sidecar_key, args.sidecar_sni),
            upstream_ca=args.upstream_ca,
            timeouts=Timeouts(args.request_timeout, args.idle_timeout, args.receive_timeout),
            data_path=args.data_path,
            listener_tls=_listener_tls(args),
        )
    except ValueError as exc:
        print(f"envoy-config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    text = render(bootstrap)
    if args.output:
        write_atomically(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the install
        print(f"demo needs the demo extra: pip install 'mcp-ext-authz[demo]' ({exc})",
              file=sys.stderr)
        return EXIT_FAILED
    return run_demo(args.base_port)


class _Parser(argparse.ArgumentParser):
    """argparse, saying a mistake in one line (and where to look), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcp-ext-authz",
        description="Envoy ext_authz (gRPC v3) sidecar for MCP servers: network visibility,"
                    " tool rules and OAuth2 client-credentials injection.",
    )
    parser.add_argument("--version", action="version", version=f"mcp-ext-authz {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="service log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "the sidecar's YAML config file"

    serve = commands.add_parser("serve", help="run the gRPC service and the admin listener")
    serve.add_argument("--config", metavar="FILE",
                       help=f"{config_help} (default: the built-in example, see"
                            " `example-config`)")
    serve.add_argument("--grace", type=_seconds, default=5.0,
                       help="seconds to drain in-flight checks on SIGTERM (default 5)")
    serve.add_argument("--workers", type=_count, default=1,
                       help="processes to run, worker i on grpc/admin port + i (default 1)")
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                       help="event loop: uvloop if installed (auto, the default) or asyncio")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="dry-run one decision and print it as JSON")
    check.add_argument("--config", required=True, metavar="FILE", help=config_help)
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
    check.add_argument("--exit-code", action="store_true",
                       help="exit 1 when the request would be denied (for scripts)")
    check.set_defaults(func=cmd_check)

    validate = commands.add_parser(
        "validate", help="check a config file: every problem listed, exit 2 if invalid")
    validate.add_argument("--config", required=True, metavar="FILE", help=config_help)
    validate.set_defaults(func=cmd_validate)

    envoy = commands.add_parser(
        "envoy-config", help="print an Envoy bootstrap (YAML) for this config")
    envoy.add_argument("--config", required=True, metavar="FILE",
                       help=f"{config_help} (its secrets are not needed)")
    envoy.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                       help="where server NAME's MCP server listens: https://host[:port][/path],"
                            " http://..., or host:port (repeatable; overrides"
                            " servers.NAME.upstream)")
    envoy.add_argument("--upstream-ca", default=None, metavar="FILE",
                       help="CA bundle for https:// upstreams (default: the system's)")
    envoy.add_argument("--listen", default="0.0.0.0:10000",
                       help="Envoy's HTTP listener (default 0.0.0.0:10000)")
    envoy.add_argument("--admin", default="127.0.0.1:9901",
                       help="Envoy's admin listener (default 127.0.0.1:9901)")
    envoy.add_argument("--sidecar", default=None, metavar="ADDRESS",
                       help="where Envoy reaches the sidecar: host:port or unix:/path"
                            " (default: grpc.listen)")
    envoy.add_argument("--workers", type=_count, default=1,
                       help="sidecar worker processes on consecutive ports (default 1)")
    envoy.add_argument("--request-timeout", type=_seconds, default=0.0, metavar="SECONDS",
                       help="limit on a whole MCP request and its answer (default 0: none;"
                            " a tool call may run for minutes)")
    envoy.add_argument("--idle-timeout", type=_seconds, default=0.0, metavar="SECONDS",
                       help="limit on an MCP stream sitting silent (default 0: none; a GET"
                            " stream may idle for hours)")
    envoy.add_argument("--receive-timeout", type=_seconds, default=None, metavar="SECONDS",
                       help="limit on receiving a request whole and judging it, before it"
                            " goes upstream; 408 past it (default 30, or longer than"
                            " tokens.timeout_s; 0: none)")
    envoy.add_argument("--data-path", choices=("ext_authz", "native"), default="ext_authz",
                       help="ext_authz (default): the sidecar decides every request;"
                            " native: Envoy enforces visibility (RBAC) and injects tokens"
                            " itself, and the sidecar serves it listener, clusters and tokens"
                            " (xDS), deciding only requests it must read (tool rules,"
                            " registry, discovery)")
    envoy.add_argument("--listen-cert", default=None, metavar="FILE",
                       help="the listener's certificate: TLS for callers, who must then"
                            " present certificates (needed by principals in network rules)")
    envoy.add_argument("--listen-key", default=None, metavar="FILE",
                       help="the key of --listen-cert")
    envoy.add_argument("--client-ca", default=None, metavar="FILE",
                       help="the CA that signs callers' certificates (their URI SANs are the"
                            " principals rules name)")
    envoy.add_argument("--sidecar-ca", default=None, metavar="FILE",
                       help="CA that signed the sidecar's certificate (when grpc.tls is set)")
    envoy.add_argument("--sidecar-cert", default=None, metavar="FILE",
                       help="Envoy's client certificate (when grpc.tls.client_ca_file is set)")
    envoy.add_argument("--sidecar-key", default=None, metavar="FILE",
                       help="the key of --sidecar-cert")
    envoy.add_argument("--sidecar-sni", default="", metavar="NAME",
                       help="SNI to send to the sidecar (a name its certificate carries)")
    envoy.add_argument("--output", default=None, metavar="FILE",
                       help="write to this file (whole, or not at all), not stdout")
    envoy.set_defaults(func=cmd_envoy_config)

    example = commands.add_parser(
        "example-config", help="print the built-in example config, with comments")
    example.set_defaults(func=cmd_example_config)

    demo = commands.add_parser(
        "demo", help="run Envoy, the sidecar, two MCP servers and a token endpoint on loopback")
    demo.add_argument("--base-port", type=_port, default=10000,
                      help="first of 7 consecutive ports (default 10000; 0 picks free ports)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        # One line per token request is noise; tokens.py says what went wrong itself.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_BAD_CONFIG
    except UsageError as exc:
        print(f"mcp-ext-authz {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except ExtAuthzError as exc:
        print(f"mcp-ext-authz: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
