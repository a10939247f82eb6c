from __future__ import annotations

import getpass
import os
import site
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from ext_authz.policy.config import Config, parse_config
from tests.token_endpoint import TokenEndpoint

# In CI the examples are derandomized (the same every run), so that a landing never hangs on
# a lucky draw; locally every run explores new ones.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True,
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("ci")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")

ROOT = Path(__file__).resolve().parents[1]


def readable_roots() -> tuple[Path, ...]:
    """Where a test may read beside the repository: the interpreter, its venv and
    site-packages, the user's packages and caches, and the temporary folders, wherever a
    user keeps them (a venv beside the clone, ~/.local for a clone in a home directory)."""
    home = Path.home()
    temporary = Path(tempfile.gettempdir())
    places = [sys.prefix, sys.base_prefix, sys.exec_prefix, site.getuserbase(),
              site.getusersitepackages(), *site.getsitepackages(),
              os.environ.get("XDG_CACHE_HOME") or home / ".cache", temporary,
              temporary / f"pytest-of-{getpass.getuser()}",  # pytest's tmp_path
              *(entry for entry in sys.path if entry)]
    return tuple(Path(place).resolve() for place in places)


def refused_path(path: Path, root: Path, readable: tuple[Path, ...],
                 siblings: frozenset[str] | None = None) -> bool:
    """Whether a test reading `path` reads what a user's clone would not have: something
    beside the repository (a sibling checkout, a shared folder) that is none of the places
    a Python install or a user's caches may be. `siblings`: what stood beside the
    repository when the run began (what a test makes there later, a temporary folder of a
    clone kept in the temp folder, is its own)."""
    beside = root.parent
    if not path.is_relative_to(beside) or path.is_relative_to(root):
        return False
    if siblings is not None and path != beside and (
            path.relative_to(beside).parts[0] not in siblings):
        return False
    # A readable place that holds the repository's parent (a clone straight in the temp
    # folder) would let every sibling through: it exempts nothing.
    return not any(path.is_relative_to(place) for place in readable
                   if not beside.is_relative_to(place))


_READABLE = readable_roots()
_SIBLINGS = frozenset(os.listdir(ROOT.parent)) - {ROOT.name}


def _inside_the_repository(event: str, args: tuple[object, ...]) -> None:
    # A user's clone has nothing beside it: a test that opens a path next to the repository
    # (a sibling checkout, a shared folder) passes here and fails there. Fail it here.
    if event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    if not isinstance(path, str | bytes | os.PathLike) or isinstance(path, int):
        return
    try:
        resolved = Path(os.fsdecode(path)).resolve()
    except (OSError, ValueError):
        return
    if refused_path(resolved, ROOT, _READABLE, _SIBLINGS):
        raise PermissionError(f"tests may not read outside the repository: {resolved}")


sys.addaudithook(_inside_the_repository)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    endpoint = await TokenEndpoint().start()
    yield endpoint
    await endpoint.stop()


def make_config(**overrides: Any) -> Config:
    """A config on loopback: 127.0.0.1 internal, 127.0.0.3 a trusted proxy."""
    data: dict[str, Any] = {
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"],
                    "trusted_proxies": ["127.0.0.3/32"]},
        "servers": {"pub": {}, "priv": {"available_on_public_internet": False}},
    }
    data.update(overrides)
    return parse_config(data, env={})
