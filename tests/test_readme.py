"""README.md says what the code does: its commands, its defaults, its Envoy snippets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ext_authz.policy.config import (
    DEFAULT_INTERNAL_RANGES,
    McpSettings,
    RoutingSettings,
    TokenSettings,
)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"


def yaml_blocks(section: str) -> list[Any]:
    """The YAML code blocks of one `## section` of README, parsed."""
    start = README.index(f"\n## {section}\n")
    end = README.find("\n## ", start + 1)
    return [yaml.safe_load(block) for block in
            re.findall(r"```yaml\n(.*?)```", README[start:end], re.DOTALL)]


def generated() -> dict[str, Any]:
    """envoy-config's output for the built-in example config."""
    example = subprocess.run([sys.executable, "-m", "ext_authz", "example-config"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    rendered = subprocess.run(
        [sys.executable, "-m", "ext_authz", "envoy-config", "--config", "/dev/stdin",
         "--upstream", "everything=127.0.0.1:8001", "--upstream", "billing-db=127.0.0.1:8002"],
        input=example, capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(yaml.safe_load(rendered))


def without_defaults(value: Any) -> Any:
    """Drop the keys whose value is a protobuf default (false): the generator omits them."""
    if isinstance(value, dict):
        return {k: without_defaults(v) for k, v in value.items() if v is not False}
    if isinstance(value, list):
        return [without_defaults(v) for v in value]
    return value


class TestCommands:
    def test_ci_runs_the_test_command_readme_gives(self) -> None:
        """README's "Test it" command is the one .ci/run runs."""
        assert TEST_COMMAND in README
        ci = (ROOT / ".ci" / "run").read_text()
        assert "pip install --quiet -e '.[test]'" in ci
        assert "\npython -m pytest -q\n" in ci


class TestDefaults:
    def test_configure_block_states_the_defaults(self) -> None:
        """The commented config in "Configure" gives the real default of every setting."""
        config = yaml_blocks("Configure")[0]
        assert config["tokens"] == TokenSettings().model_dump()
        assert config["mcp"] == McpSettings().model_dump()
        routing = RoutingSettings().model_dump()
        assert {k: config["routing"][k] for k in routing} == routing
        assert config["network"]["internal_ranges"] == list(DEFAULT_INTERNAL_RANGES)
        assert config["grpc"]["listen"] == "127.0.0.1:9191"
        assert config["admin"]["listen"] == "127.0.0.1:9192"


class TestEnvoySnippets:
    def test_snippets_are_the_generators_output(self) -> None:
        """The filters, the sidecar cluster and a route, as envoy-config renders them."""
        filters, clusters, routes = yaml_blocks("Envoy")
        bootstrap = generated()
        manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"][0]["typed_config"]
        assert without_defaults(filters["http_filters"]) == manager["http_filters"]
        [authz] = [f for f in filters["http_filters"]
                   if f["name"] == "envoy.filters.http.ext_authz"]
        assert authz["typed_config"]["failure_mode_allow"] is False
        [sidecar] = [c for c in bootstrap["static_resources"]["clusters"]
                     if c["name"] == "mcp_ext_authz"]
        assert clusters["clusters"] == [sidecar]
        for route in routes:
            assert route in manager["route_config"]["virtual_hosts"][0]["routes"]
