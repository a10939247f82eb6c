"""`validate` and `example-config`: the config file itself."""

from __future__ import annotations

import argparse
import sys

from ..policy.config import EXAMPLE_CONFIG
from .common import CONFIG_HELP, EXIT_OK, Commands, load


def cmd_validate(args: argparse.Namespace) -> int:
    config = load(args.config)
    print(f"{args.config}: ok, {len(config.servers)} servers")
    return EXIT_OK


def cmd_example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(EXAMPLE_CONFIG)
    return EXIT_OK


def add_validate_parser(commands: Commands) -> None:
    """The `validate` command's flags."""
    validate = commands.add_parser(
        "validate", help="check a config file: every problem listed, exit 2 if invalid")
    validate.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
    validate.set_defaults(func=cmd_validate)


def add_example_parser(commands: Commands) -> None:
    """The `example-config` command's flags."""
    example = commands.add_parser(
        "example-config", help="print the built-in example config, with comments")
    example.set_defaults(func=cmd_example_config)
