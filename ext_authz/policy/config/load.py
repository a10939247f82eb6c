"""Loading a config: YAML (duplicate keys and YAML 1.1 booleans refused), `${VAR}`
expansion, `*_file` secrets, and every problem at once (ConfigError)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ...errors import ConfigError
from .models import Config
from .problems import (
    describe_error,
    exchange_problems,
    exposure_problems,
    key_path,
    listener_problems,
    read_files,
    visibility_problems,
)

# $$ is a dollar sign; ${VAR} and ${VAR:-default} come from the environment; any other $ is
# refused (a shell would read "$S" as a variable, we would have kept it as text).
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)
# YAML 1.1 reads yes/no/on/off as booleans; for security booleans only true and false may
# mean true and false (YAML 1.2's core schema): `off` stays a string, and is refused.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass
class _Expansion:
    """What substituting ${VAR}s found: problems, and the keys an unset variable left blank."""

    env: Mapping[str, str]
    require: bool  # an unset variable is a problem (not so for dry runs and envoy-config)
    problems: list[str] = field(default_factory=list)
    unset: set[str] = field(default_factory=set)

    def expand(self, value: Any, path: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self.expand(v, f"{path}.{k}" if path else str(k))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def substitute(match: re.Match[str]) -> str:
            text = match.group(0)
            if text == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name is None:
                self.problems.append(f"{path}: a lone '$' (write $$ for a dollar sign, ${{VAR}}"
                                     " or ${VAR:-default} for an environment variable)")
                return text
            value = self.env.get(name, "")
            if value:
                return value
            if default is not None:
                return default
            if name not in self.env:
                self.unset.add(path)
                if self.require:
                    self.problems.append(f"{path}: environment variable ${{{name}}} is not set")
                return f"unset-{name}"
            return value

        return _VAR.sub(substitute, value)


def parse_config(data: Any, env: Mapping[str, str] | None = None,
                 source: str = "config", *, secrets: bool = True) -> Config:
    """Validate a parsed YAML document into a Config, or raise ConfigError listing every problem.

    With `secrets=False` (dry runs, `envoy-config`) no secret is needed: an unset ${VAR}
    becomes a placeholder, and no `client_secret_file` nor TLS file is read.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping"], source)
    expansion = _Expansion(os.environ if env is None else env, require=secrets)
    expanded = expansion.expand(data)
    problems = expansion.problems
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        # A setting an unset variable left blank is reported once, as unset.
        problems += [problem for error in exc.errors()
                     if key_path(error["loc"]) not in expansion.unset
                     for problem in (describe_error(error),)]
        raise ConfigError(problems, source) from None
    problems += (visibility_problems(config) + exposure_problems(config)
                 + listener_problems(config) + exchange_problems(config))
    if config.network.uses_claims and config.jwt is None:
        problems += [f"network.networks.{name}.jwt_claims: needs `jwt`, the provider whose"
                     " tokens Envoy verifies (issuer, jwks_uri or jwks_file)"
                     for name, network in config.network.networks.items() if network.jwt_claims]
    if secrets:
        config, file_problems = read_files(config)
        problems += file_problems
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *,
                secrets: bool = True) -> Config:
    """Read and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"(file): not UTF-8 text (byte {exc.start} is"
                           f" 0x{exc.object[exc.start]:02x})"], source) from None
    except OSError as exc:
        raise ConfigError([f"(file): cannot read ({exc.strerror})"], source) from None
    return parse_yaml(text, env, source, secrets=secrets)


def parse_yaml(text: str, env: Mapping[str, str] | None = None, source: str = "config", *,
               secrets: bool = True) -> Config:
    """Validate YAML text into a Config."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    if data is None:
        raise ConfigError(["(file): empty: a config names its MCP servers under `servers`"
                           " (mcp-ext-authz example-config prints one)"], source)
    return parse_config(data, env, source, secrets=secrets)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line, by line and column of the file (not PyYAML's own quote of
    "<unicode string>")."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return f"(yaml): {exc}".replace("\n", " ")
    mark = exc.problem_mark
    context = f" ({exc.context})" if exc.context else ""
    return f"(yaml) line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
