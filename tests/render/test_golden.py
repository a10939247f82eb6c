"""envoy-config's output, byte for byte, for each case in both data paths (Istio's
authz/builder testdata in/out pairs are the model).

Each `cases/NAME.yaml` holds a sidecar config (inline, a file of the repository, or the
built-in example) and envoy-config's flags; `golden/NAME.DATA_PATH.yaml` holds the output,
or the exit code and message of a refusal. To accept a deliberate change of the output:

    MCP_EXT_AUTHZ_UPDATE_GOLDEN=1 python -m pytest tests/render
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz import cli
from ext_authz.policy.config import EXAMPLE_CONFIG

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CASES = sorted(path.stem for path in (HERE / "cases").glob("*.yaml"))
DATA_PATHS = ("ext_authz", "native")
UPDATE = bool(os.environ.get("MCP_EXT_AUTHZ_UPDATE_GOLDEN"))


def _config_text(case: dict[str, Any]) -> str:
    if case.get("example"):
        return EXAMPLE_CONFIG
    if "config_file" in case:
        return (ROOT / case["config_file"]).read_text()
    return yaml.safe_dump(case["config"], sort_keys=False)


def render(name: str, data_path: str, tmp_path: Path,
           capsys: pytest.CaptureFixture[str]) -> str:
    """What `envoy-config` prints for a case: its output, or its exit code and message."""
    case = yaml.safe_load((HERE / "cases" / f"{name}.yaml").read_text())
    config = tmp_path / "sidecar.yaml"
    config.write_text(_config_text(case))
    code = cli.main(["envoy-config", "--config", str(config), "--data-path", data_path,
                     "--node-id", "golden",
                     *case.get("flags", [])])
    out, err = capsys.readouterr()
    if code != 0:
        return f"# exit {code}\n{err.replace(str(config), 'CONFIG')}"
    assert not err
    if data_path == "native":
        out += served(yaml.safe_load(out), config)
    return out


def served(bootstrap: dict[str, Any], config_path: Path) -> str:
    """The listener and clusters the sidecar serves a native bootstrap's Envoy over ADS."""
    from ext_authz.contract import NODE_KEY
    from ext_authz.policy.config import load_config
    from ext_authz.render.native import snapshot as data_plane_resources
    from ext_authz.render.options import DataPlane, HostPort, watchdog_address

    config = load_config(config_path, env={}, secrets=False)
    plane = DataPlane.from_struct(bootstrap["node"]["metadata"][NODE_KEY])
    watchdog = watchdog_address(config, plane)
    if isinstance(watchdog, HostPort) and not watchdog.host[0].isdigit():
        watchdog = HostPort("192.0.2.1", watchdog.port)  # the control plane resolves a name
    listener, clusters = data_plane_resources(config, plane, watchdog=watchdog)
    resources = {"listener": listener.to_dict(casing=_snake()),
                 "clusters": [cluster.to_dict(casing=_snake()) for cluster in clusters]}
    return "# Served over ADS:\n" + yaml.safe_dump(resources, sort_keys=False, width=100)


def _snake() -> Any:
    import betterproto2

    return betterproto2.Casing.SNAKE


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("name", CASES)
def test_rendering_matches_its_golden_file(name: str, data_path: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The renderer's output is the golden file's, byte for byte."""
    got = render(name, data_path, tmp_path, capsys)
    golden = HERE / "golden" / f"{name}.{data_path}.yaml"
    if UPDATE:
        golden.write_text(got)
    assert golden.exists(), f"no golden file {golden.name}: run with MCP_EXT_AUTHZ_UPDATE_GOLDEN=1"
    assert got == golden.read_text()


def test_every_golden_file_has_its_case() -> None:
    """A golden file whose case is gone fails, rather than lingering unchecked."""
    expected = {f"{name}.{data_path}.yaml" for name in CASES for data_path in DATA_PATHS}
    assert {path.name for path in (HERE / "golden").iterdir()} == expected
