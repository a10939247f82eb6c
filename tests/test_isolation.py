"""The suite's guard against reading beside the repository (tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import refused_path

WORK = Path("/work")
CLONE = WORK / "p"
HOME_CLONE = Path("/home/u/p")


@pytest.mark.parametrize(("path", "root", "readable", "refused"), [
    # A clone with its venv beside it: the venv is the interpreter's, readable.
    (WORK / "v/lib/python3.11/site-packages/httpx/__init__.py", CLONE, (WORK / "v",), False),
    # ... but a sibling checkout or a shared folder is not.
    (WORK / "other/.git/HEAD", CLONE, (WORK / "v",), True),
    (WORK / "shared/fixtures/x.bin", CLONE, (WORK / "v",), True),
    # A clone in a home directory: ~/.local and ~/.cache are the user's, readable.
    (Path("/home/u/.local/lib/python3.11/site-packages/m.py"), HOME_CLONE,
     (Path("/home/u/.local"), Path("/home/u/.cache")), False),
    (Path("/home/u/.cache/pip/x"), HOME_CLONE,
     (Path("/home/u/.local"), Path("/home/u/.cache")), False),
    (Path("/home/u/projects/secret.txt"), HOME_CLONE, (Path("/home/u/.local"),), True),
    # The repository itself and everything not beside it.
    (CLONE / "tests/conftest.py", CLONE, (), False),
    (Path("/usr/lib/python3.11/os.py"), CLONE, (), False),
    # A readable place that holds the clone's parent exempts nothing beside it.
    (WORK / "other/x", CLONE, (Path("/"), WORK), True),
])
def test_refused_paths(path: Path, root: Path, readable: tuple[Path, ...],
                       refused: bool) -> None:
    """Only what a user's clone would not have beside it is refused."""
    assert refused_path(path, root, readable) is refused


def test_what_a_run_makes_beside_the_repository_is_its_own() -> None:
    """A clone kept straight in the temp folder: the siblings that stood there when the run
    began are refused, the folders a test makes there later are not, nor pytest's."""
    tmp, clone = Path("/tmp"), Path("/tmp/p")
    readable = (tmp, tmp / "pytest-of-u")
    siblings = frozenset({"other-checkout", "shared", "pytest-of-u"})
    assert refused_path(tmp / "other-checkout/x", clone, readable, siblings)
    assert refused_path(tmp / "shared/fixtures/x", clone, readable, siblings)
    assert refused_path(tmp, clone, readable, siblings)  # listing the parent names them
    assert not refused_path(tmp / "tmp1a2b3c/x", clone, readable, siblings)
    assert not refused_path(tmp / "pytest-of-u/pytest-7/x", clone, readable, siblings)


def test_the_guard_refuses_to_look_beside_the_repository() -> None:
    """The installed hook raises on listing what stands beside the repository (where a
    sibling checkout would be found), naming the path."""
    beside = Path(__file__).resolve().parents[2]
    with pytest.raises(PermissionError, match="outside the repository"):
        os.listdir(beside)
