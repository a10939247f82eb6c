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
