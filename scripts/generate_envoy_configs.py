"""Regenerate the checked-in Envoy configs under envoy/ from the generator.

    python scripts/generate_envoy_configs.py          # write
    python scripts/generate_envoy_configs.py --check  # exit 1 if a file has drifted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ext_authz.demo import DemoPorts, envoy_config, sidecar_config
from ext_authz.policy.config import UpstreamAddress, load_config
from ext_authz.render.bootstrap import build_bootstrap, render
from ext_authz.render.options import DATA_PATHS, HostPort, SidecarTLS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_ENV = {"DEMO_SECRET_DEMO_PUBLIC": "x", "DEMO_SECRET_DEMO_INTERNAL": "x"}


def rendered() -> dict[Path, str]:
    """Every generated file and the text it must hold."""
    ports = DemoPorts.from_base(10000)
    demo_sidecar = sidecar_config(ports)
    # The certificates are the `certs` service's, made when the stack starts.
    compose = load_config(ROOT / "envoy/compose/sidecar.yaml", env=COMPOSE_ENV, secrets=False)
    compose_envoy = {data_path: render(build_bootstrap(
        compose,
        {"public": UpstreamAddress("mcp-public", 8000),
         "internal": UpstreamAddress("mcp-internal", 8000)},
        listen=HostPort("::", 10000),  # the compose networks are dual-stack
        admin=HostPort("0.0.0.0", 9901),
        sidecar=HostPort("sidecar", 9191),
        sidecar_tls=SidecarTLS("/certs/envoy/ca.pem", "/certs/envoy/envoy.pem",
                               "/certs/envoy/envoy.key", "sidecar"),
        data_path=data_path,
    )) for data_path in DATA_PATHS}
    return {
        ROOT / "envoy/demo/sidecar.yaml": demo_sidecar,
        ROOT / "envoy/demo/envoy.yaml": envoy_config(demo_sidecar, ports),
        ROOT / "envoy/compose/envoy.yaml": compose_envoy["ext_authz"],
        ROOT / "envoy/compose/envoy-native.yaml": compose_envoy["native"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    drifted = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                drifted.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for name in drifted:
        print(f"drifted from the generator: {name}", file=sys.stderr)
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
