"""`serve`: run the gRPC service and the admin listener."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from .common import CONFIG_HELP, EXIT_OK, Commands, UsageError, count, load, seconds


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
    config = load(args.config)
    if args.config is None:
        logging.getLogger(__name__).warning(
            "no --config given: serving the built-in example config"
            " (`mcp-ext-authz example-config` prints it)")
    if args.workers > 1:
        from ..workers import run_workers

        return run_workers(args.workers, args.config, args.grace, args.log_level, args.loop)

    from ..server import Sidecar  # grpc server machinery only for the command that serves

    sidecar = Sidecar(config, Path(args.config) if args.config else None, grace_s=args.grace,
                      worker=args.worker)
    run_loop(sidecar.run(), args.loop)
    return EXIT_OK


def add_parser(commands: Commands) -> None:
    """The `serve` command's flags."""
    serve = commands.add_parser("serve", help="run the gRPC service and the admin listener")
    serve.add_argument("--config", metavar="FILE",
                       help=f"{CONFIG_HELP} (default: the built-in example, see"
                            " `example-config`)")
    serve.add_argument("--grace", type=seconds, default=5.0,
                       help="seconds to drain in-flight checks on SIGTERM (default 5)")
    serve.add_argument("--workers", type=count, default=1,
                       help="processes to run, worker i on grpc/admin port + i (default 1)")
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                       help="event loop: uvloop if installed (auto, the default) or asyncio")
    serve.set_defaults(func=cmd_serve)
