"""The `mcp-ext-authz` command: serve, check, validate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config, example_config, load_config
from .decision import Decision, Policy, RequestFacts, decide, explain
from .errors import ConfigError, TokenError
from .tokens import TokenCache

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def _load(path: str | None) -> Config:
    return example_config() if path is None else load_config(path)


def _print_config_error(exc: ConfigError) -> None:
    print(f"invalid config {exc.source}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _run_loop(coroutine: Any) -> Any:
    try:
        import uvloop  # optional: measurably cheaper event loop (see bench/)
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Sidecar  # grpc server machinery only for the command that serves

    config = _load(args.config)
    if args.config is None:
        logging.getLogger(__name__).warning(
            "no --config given: serving the built-in example config (see README)"
        )
    sidecar = Sidecar(config, Path(args.config) if args.config else None, grace_s=args.grace)
    _run_loop(sidecar.run())
    return EXIT_OK


def _context_extensions(pairs: Sequence[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--context-extension {pair!r}: expected key=value")
        result[key] = value
    return result


def check_report(decision: Decision) -> dict[str, Any]:
    """The JSON object `check` prints for a decision."""
    client = decision.client.address
    return {
        "client_ip": str(client) if client is not None else None,
        "network": decision.network,
        "server": decision.server_name,
        "allowed": decision.allowed,
        "http_status": decision.http_status,
        "reason": decision.reason,
        "inject_token": decision.oauth2 is not None,
        "steps": explain(decision),
    }


async def _fetch_token(config: Config, decision: Decision, report: dict[str, Any]) -> None:
    oauth2 = decision.oauth2
    if oauth2 is None:
        report["token"] = {"fetched": False, "why": "no token would be injected"}
        return
    cache = TokenCache(config.tokens)
    try:
        token, lifetime = await cache.fetch_now(oauth2, decision.server_name or "")
        report["token"] = {"fetched": True, "length": len(token), "cache_lifetime_s": lifetime}
    except TokenError as exc:
        report["token"] = {"fetched": False, "error": str(exc)}
        report["allowed"] = False
        report["reason"] = "upstream_credentials_unavailable"
        report["http_status"] = 503
    finally:
        await cache.aclose()


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    facts = RequestFacts(
        peer=args.peer,
        x_forwarded_for=args.xff,
        path=args.path,
        authority=args.host,
        context_extensions=_context_extensions(args.context_extension),
    )
    decision = decide(facts, Policy.from_config(config))
    report = check_report(decision)
    if args.fetch_token:
        asyncio.run(_fetch_token(config, decision, report))
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok, {len(config.servers)} servers")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-ext-authz",
        description="Envoy ext_authz (gRPC v3) sidecar for MCP servers.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC service and the admin listener")
    serve.add_argument("--config", help="YAML config (default: the built-in example)")
    serve.add_argument("--grace", type=float, default=5.0,
                       help="seconds to drain in-flight checks on SIGTERM (default 5)")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="dry-run one decision and print it as JSON")
    check.add_argument("--config", required=True)
    check.add_argument("--peer", required=True, help="the downstream peer address Envoy saw")
    check.add_argument("--xff", default=None, help='X-Forwarded-For value, e.g. "a, b"')
    check.add_argument("--path", default="/", help="request path (default /)")
    check.add_argument("--host", default="", help=":authority of the request")
    check.add_argument("--context-extension", action="append", default=[], metavar="K=V",
                       help="an Envoy context extension (repeatable)")
    check.add_argument("--fetch-token", action="store_true",
                       help="really fetch the token (its length and lifetime are printed,"
                            " never the token)")
    check.set_defaults(func=cmd_check)

    validate = commands.add_parser("validate", help="check a config file; exit 2 if invalid")
    validate.add_argument("--config", required=True)
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_BAD_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
