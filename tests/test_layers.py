"""The package's layers: each imports only those below it (docs/design.md, "Layout").

contract and errors import nothing of ours; mcp and policy are pure, policy above mcp; the
renderer and the edges both read the policy and never each other; server, cli and demo sit
on top. A climbing import fails here, naming the module and what it imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ext_authz"
BASE = {"contract", "errors", "client_assertion"}
# Each layer -> the layers it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "errors": set(),
    "client_assertion": set(),
    "mcp": BASE,
    "policy": BASE | {"mcp"},
    "render": BASE | {"mcp", "policy"},
    "token_requests": BASE | {"policy"},
    "tokens": BASE | {"policy", "token_requests"},
    "exchange": BASE | {"policy", "token_requests", "tokens"},
    "ops": BASE | {"mcp", "policy"},
    "edges": BASE | {"_proto", "mcp", "policy", "ops", "tokens", "exchange"},
    "server": BASE | {"_proto", "mcp", "policy", "render", "edges", "ops", "tokens",
               "exchange"},
    "workers": BASE | {"server"},
    "demo": BASE | {"mcp", "policy", "render"},
    "cli": BASE | {"", "mcp", "policy", "render", "edges", "ops", "tokens", "exchange", "server",
                   "workers", "demo"},
    "__main__": {"cli"},
    "": set(),  # ext_authz/__init__.py
}


def _module(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def imports(path: Path, package: Path = PACKAGE) -> list[tuple[str, int]]:
    """What a file imports (TYPE_CHECKING imports too), with the lines."""
    module = _module(path, package)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def climbing_imports(package: Path = PACKAGE) -> list[str]:
    """Every import of ours that goes up or across the layers, as 'file:line: a -> b'."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        if "_proto" in path.parts:
            continue
        layer = _layer(_module(path, package))
        for target, line in imports(path, package):
            if target != "ext_authz" and not target.startswith("ext_authz."):
                continue
            wanted = _layer(target)
            if wanted != layer and wanted not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(package.parent)}:{line}:"
                                f" {layer or 'ext_authz'} imports {target}")
    return problems


def test_no_layer_imports_one_above_or_beside_it() -> None:
    """Every import of ours goes down the layers (render and edges never meet)."""
    assert climbing_imports() == []


def test_every_layer_is_known() -> None:
    """A new top-level module or folder is placed in a layer before it is imported."""
    names = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if path.name != "__pycache__" and (path.suffix == ".py" or path.is_dir())}
    assert names - {"_proto", "__init__", "py"} <= set(ALLOWED)


def test_only_the_renderer_imports_envoy_data_plane() -> None:
    """envoy_data_plane (and its betterproto2) is imported under ext_authz/render/ only."""
    outside = [f"{path.relative_to(PACKAGE.parent)}:{line}"
               for path in PACKAGE.rglob("*.py")
               if "render" not in path.relative_to(PACKAGE).parts[:1]
               for target, line in imports(path)
               if target.split(".")[0] in ("envoy_data_plane", "betterproto2")]
    assert outside == []


@pytest.mark.parametrize("module", ["ext_authz.render", "ext_authz.render.bootstrap",
                                    "ext_authz.render.native", "ext_authz.cli"])
def test_the_renderer_loads_neither_grpc_nor_httpx(module: str) -> None:
    """Rendering a config (and the CLI that does it) never loads the serving stack."""
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(sorted({{m.split('.')[0] for m"
                               " in sys.modules} & {'grpc', 'httpx'}))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_a_climbing_import_is_caught(tmp_path: Path) -> None:
    """The check itself fails on a climbing import: the renderer importing an edge."""
    package = tmp_path / "ext_authz"
    (package / "render").mkdir(parents=True)
    (package / "render" / "plan.py").write_text("from ..edges.authz import judge\n")
    assert climbing_imports(package) == [
        "ext_authz/render/plan.py:1: render imports ext_authz.edges.authz"]
