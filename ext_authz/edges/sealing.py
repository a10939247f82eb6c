"""The sidecar's sealing key for hidden items' fresh names (mcp/seal.py)."""

from __future__ import annotations

import os
import secrets
from functools import cache

from ..contract import SEAL_KEY_ENV
from ..errors import ConfigError
from ..mcp.seal import Sealer


@cache
def process_sealer() -> Sealer:
    """This process's Sealer: under the key in MCP_EXT_AUTHZ_SEAL_KEY (a parent's, shared
    by its workers), or one of its own."""
    given = os.environ.get(SEAL_KEY_ENV)
    if not given:
        return Sealer(secrets.token_bytes(32))
    try:
        return Sealer(bytes.fromhex(given))
    except ValueError:
        raise ConfigError([f"{SEAL_KEY_ENV}: not a hex key of at least 16 bytes"]) from None
