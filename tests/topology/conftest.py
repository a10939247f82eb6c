"""The docker-compose topology in network namespaces, shared by the tests of this folder.

Needs root and `ip netns`. Without them the tests skip with the reason, unless
MCP_EXT_AUTHZ_TOPOLOGY=required (set by .ci/run on a machine that can run them), in which
case they fail: CI is never green without them where they could have run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.topology.compose import ROOT, load_compose
from tests.topology.netns import Lab, unavailable_reason
from tests.topology.stack import Stack

REQUIRED = os.environ.get("MCP_EXT_AUTHZ_TOPOLOGY") == "required"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    reason = unavailable_reason()
    if reason is not None:
        message = f"topology tests need root and `ip netns`: {reason}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def compose(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """docker-compose.yaml with every profile, up in namespaces; secrets at their defaults."""
    topology = load_compose(ROOT / "docker-compose.yaml", env={}, profiles={"lb"})
    stack = Stack(topology, lab, tmp_path_factory.mktemp("compose"))
    try:
        yield stack.up()
    finally:
        stack.down()
