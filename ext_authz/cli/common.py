"""What every command shares: exit codes, usage errors, loading a config, argument types."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ..errors import ConfigError
from ..policy.config import Config, config_warnings, example_config, load_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
CONFIG_HELP = "the sidecar's YAML config file"
Commands = Any  # argparse's subparsers action (a private type)


class UsageError(Exception):
    """A flag or a file named on the command line that cannot be used (exit 2)."""


def load(path: str | None, *, secrets: bool = True) -> Config:
    config = example_config() if path is None else load_config(path, secrets=secrets)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return config


def print_config_error(exc: ConfigError) -> None:
    print(f"invalid config {exc.source}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse, saying a mistake in one line (and where to look), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)
