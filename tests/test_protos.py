"""The committed stubs are a fresh generation of protos/, and parse what Envoy really sends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "envoy-1.40-check-request.bin"


def test_committed_stubs_match_generation() -> None:
    """scripts/generate_protos.py --check finds no difference."""
    result = subprocess.run([sys.executable, "scripts/generate_protos.py", "--check"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_envoy_1_40_request_parses() -> None:
    """A CheckRequest captured from Envoy 1.40 parses with the trimmed protos."""
    request = external_auth_pb2.CheckRequest.FromString(FIXTURE.read_bytes())
    http = request.attributes.request.http
    assert request.attributes.source.address.socket_address.address == "127.0.0.1"
    assert http.headers["x-forwarded-for"] == "203.0.113.7"
    assert http.headers[":path"] == http.path == "/api/v1/items?id=42"
    assert http.host == "127.0.0.1:10001"
    assert http.method == "GET"


def test_capture_script_captures_what_the_fixture_holds(tmp_path: Path) -> None:
    """scripts/capture_check_request.py, run against the wheel's Envoy, gives those facts."""
    output = tmp_path / "captured.bin"
    result = subprocess.run([sys.executable, "scripts/capture_check_request.py",
                             "--output", str(output)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    captured = external_auth_pb2.CheckRequest.FromString(output.read_bytes())
    fixture = external_auth_pb2.CheckRequest.FromString(FIXTURE.read_bytes())
    for request in (captured, fixture):
        http = request.attributes.request.http
        assert request.attributes.source.address.socket_address.address == "127.0.0.1"
        assert (http.method, http.path, http.host) == ("GET", "/api/v1/items?id=42",
                                                       "127.0.0.1:10001")
        assert http.headers["x-forwarded-for"] == "203.0.113.7"
