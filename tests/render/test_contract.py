"""The names the sidecar and its rendered Envoy config agree on are spelt once (contract)."""

from __future__ import annotations

from ext_authz import contract
from ext_authz.render.filters import challenge


def test_the_challenge_script_spells_the_contracts_names() -> None:
    """challenge.lua, a file of its own, names the filter's namespace and keys as the
    contract does (the renderer writes the route metadata it reads)."""
    script = challenge.source()
    assert f'"{contract.CHALLENGE_FILTER}"' in script
    assert f'"{contract.CHALLENGE_ORIGIN}"' in script
    assert f'"{contract.CHALLENGE_METADATA_PATH}"' in script


def test_the_script_ships_with_the_package() -> None:
    """The script is read from the installed package, not from a source checkout."""
    assert challenge.source().startswith("function envoy_on_request(handle)")
