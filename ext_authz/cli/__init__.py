"""The command line: `mcp-ext-authz COMMAND`, one module per command (its parser and its
work), errors turned into one line and an exit code here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, ExtAuthzError
from . import check, config_file, demo, diff, envoy_config, serve
from .common import EXIT_BAD_CONFIG, EXIT_FAILED, Parser, UsageError, print_config_error
from .serve import run_loop

__all__ = ["build_parser", "main", "run_loop"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mcp-ext-authz",
        description="Envoy ext_authz (gRPC v3) sidecar for MCP servers: network visibility,"
                    " tool rules and OAuth2 client-credentials injection.",
    )
    parser.add_argument("--version", action="version", version=f"mcp-ext-authz {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="service log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve.add_parser(commands)
    check.add_parser(commands)
    config_file.add_validate_parser(commands)
    diff.add_parser(commands)
    envoy_config.add_parser(commands)
    config_file.add_example_parser(commands)
    demo.add_parser(commands)
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
        print_config_error(exc)
        return EXIT_BAD_CONFIG
    except UsageError as exc:
        print(f"mcp-ext-authz {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except ExtAuthzError as exc:
        print(f"mcp-ext-authz: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code

