"""README.md and the guides in docs/ say what the code does: their commands, defaults, config
snippets and Envoy snippets are the code's own or are checked here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ext_authz.policy.config import (
    DEFAULT_INTERNAL_RANGES,
    Config,
    McpSettings,
    RoutingSettings,
    TokenSettings,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"
FAST_COMMAND = 'python -m pytest -q -m "not e2e and not slow" --ignore=tests/topology'
README_MAX_LINES = 300


def yaml_blocks(section: str, page: str = "configuration.md") -> list[Any]:
    """The YAML code blocks of one `## section` of a guide, parsed."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return [yaml.safe_load(block) for block in
            re.findall(r"```yaml\n(.*?)```", text[start:end], re.DOTALL)]


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


class TestFrontDoor:
    def test_readme_is_a_front_door(self) -> None:
        """README stays short: what it is, how to start and test, where to go next."""
        assert len(README.splitlines()) <= README_MAX_LINES

    def test_readme_gives_a_fast_subset(self) -> None:
        """The unit-test subset README names is a real selection: its markers exist."""
        assert FAST_COMMAND in README
        markers = "\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
            "pytest"]["ini_options"]["markers"])
        assert "e2e:" in markers
        assert "slow:" in markers

    def test_every_link_leads_somewhere(self) -> None:
        """Each relative link in README and the guides names a file of the repository."""
        for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
                assert (page.parent / target).exists(), f"{page.name}: {target}"

    def test_config_snippets_are_valid_configs(self) -> None:
        """Every sidecar config snippet in README and the guides loads (a tools fragment as a
        server's)."""
        pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
        checked = 0
        for page in pages:
            if page.name == "envoy.md":
                continue  # Envoy's own config: TestEnvoySnippets
            for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.DOTALL):
                data = yaml.safe_load(block)
                if set(data) == {"tools"}:
                    data = {"servers": {"s": data}}
                parse_config(data, env={"GITHUB_MCP_SECRET": "x"}, secrets=False)
                checked += 1
        assert checked >= 5


class TestReference:
    def test_every_key_is_in_the_reference_table(self) -> None:
        """docs/configuration.md's table lists every key of the config, and no other."""
        text = (DOCS / "configuration.md").read_text()
        table = text[text.index("\n## Every key\n"):text.index("\n## Trust")]
        listed = set(re.findall(r"^\| `([a-z_.A-Z0-9]+)` \|", table, re.MULTILINE))
        assert listed == set(config_keys(Config))

    def test_the_table_states_the_defaults(self) -> None:
        """Each plain default in the table is the model's."""
        text = (DOCS / "configuration.md").read_text()
        rows = dict(re.findall(r"^\| `([a-z_.A-Z0-9]+)` \| [^|]+ \| `([^`]*)` \|", text,
                               re.MULTILINE))
        for key, default in config_keys(Config).items():
            if key in rows and default is not None and not isinstance(default, tuple | dict):
                shown = (str(default).lower() if isinstance(default, bool)
                         else '""' if default == "" else str(default))
                assert rows[key] == shown, key


def config_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a settings model (NAME for a map's keys), with its plain default."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if field.exclude:  # filled in by load_config (admin.auth.token), not a config key
            continue
        path = f"{prefix}{name}"
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            value = typing.get_args(annotation)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                keys.update(config_keys(value, f"{path}.NAME."))
                continue
        nested = [arg for arg in (annotation, *typing.get_args(annotation))
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if nested:
            keys.update(config_keys(nested[0], f"{path}."))
            continue
        default = field.default
        keys[path] = None if default is PydanticUndefined or default is None else default
    return keys


class TestDefaults:
    def test_configure_block_states_the_defaults(self) -> None:
        """The commented config in "Configure" gives the real default of every setting."""
        config = yaml_blocks("The whole file, with its defaults")[0]
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
        filters, clusters, routes = yaml_blocks("Hand-written Envoy config", "envoy.md")
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
