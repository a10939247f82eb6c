from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from ext_authz.config import Config, parse_config
from tests.token_endpoint import TokenEndpoint

# In CI the examples are derandomized (the same every run), so that a landing never hangs on
# a lucky draw; locally every run explores new ones.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True,
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("ci")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")


@pytest.fixture
async def token_endpoint() -> AsyncIterator[TokenEndpoint]:
    endpoint = await TokenEndpoint().start()
    yield endpoint
    await endpoint.stop()


def make_config(**overrides: Any) -> Config:
    """A config on loopback: 127.0.0.1 internal, 127.0.0.3 a trusted proxy."""
    data: dict[str, Any] = {
        "grpc": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "network": {"internal_ranges": ["127.0.0.1/32", "::1/128"],
                    "trusted_proxies": ["127.0.0.3/32"]},
        "servers": {"pub": {}, "priv": {"available_on_public_internet": False}},
    }
    data.update(overrides)
    return parse_config(data, env={})
