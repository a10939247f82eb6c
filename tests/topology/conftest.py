"""The docker-compose topology in network namespaces, shared by the tests of this folder.

Needs root and `ip netns`. Without them the tests skip with the reason, unless
MCP_EXT_AUTHZ_TOPOLOGY=required (set by .ci/run on a machine that can run them), in which
case they fail: CI is never green without them where they could have run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ext_authz.render.options import DATA_PATHS
from tests.topology.compose import ROOT, load_compose
from tests.topology.netns import Lab, unavailable_reason
from tests.topology.stack import Stack

REQUIRED = os.environ.get("MCP_EXT_AUTHZ_TOPOLOGY") == "required"


@pytest.fixture(scope="session")
def namespaces_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        message = f"topology tests need root and `ip netns`: {reason}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", params=DATA_PATHS)
def compose(request: pytest.FixtureRequest, namespaces_available: None,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """docker-compose.yaml with every profile, up in namespaces; secrets at their defaults.

    Once per data path, each in a lab of its own: the compose Envoy runs
    envoy/compose/envoy.yaml, then (as `ENVOY_CONFIG=envoy-native.yaml docker compose up`
    would) envoy-native.yaml.
    """
    data_path = request.param
    env = {"ENVOY_CONFIG": "envoy-native.yaml"} if data_path == "native" else {}
    workdir = tmp_path_factory.mktemp(f"compose-{data_path}")
    topology = load_compose(ROOT / "docker-compose.yaml", env=env, profiles={"lb"},
                            workdir=workdir)
    lab = Lab()
    try:
        stack = Stack(topology, lab, workdir, data_path)
        try:
            yield stack.up()
        finally:
            stack.down()
    finally:
        lab.close()
