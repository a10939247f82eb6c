"""What a fleet of Envoys costs one sidecar: CPU per token refresh and per reload, and how
long a reload takes to reach the last Envoy, for fleets of 1, 4, 8 and 16 side by side.

    python bench/fleet.py            # about 2 minutes
    python bench/fleet.py --smoke    # proves it runs (CI; no figures to read)

Each Envoy is on the native data path with its own listen and admin ports and node id,
`--concurrency 1`, fed by one sidecar (a subprocess, so its CPU is its own: /proc). The
token endpoint issues 4-second tokens, refreshed every 2.4 s. Idle: no requests, only what
the fleet's streams and the watchdog's health checks cost. A reload adds a server; it has
reached an Envoy when that Envoy's admin lists the new cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ext_authz.demo import envoy_binary  # noqa: E402
from ext_authz.policy.config import load_config  # noqa: E402
from ext_authz.render.bootstrap import build_bootstrap, render  # noqa: E402
from ext_authz.render.options import HostPort  # noqa: E402
from tests.e2e.harness import free_port  # noqa: E402
from tests.token_endpoint import ThreadedTokenEndpoint  # noqa: E402

TOKEN_S = 4
TOKENS = {"expiry_buffer_s": 1, "min_ttl_s": 1, "retry_initial_s": 0.2, "retry_max_s": 1}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _until(check: Any, timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _lists(admin: int, cluster: str) -> bool:
    try:
        return cluster in httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=1).text
    except httpx.HTTPError:
        return False


def measure(size: int, idle_s: float, workdir: Path) -> dict[str, float]:
    """One fleet: sidecar CPU per refresh (idle), and per reload with its reach."""
    grpc, admin = free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    with ThreadedTokenEndpoint() as tokens:
        tokens.expires_in = TOKEN_S
        config = {
            "grpc": {"listen": f"127.0.0.1:{grpc}"}, "admin": {"listen": f"127.0.0.1:{admin}"},
            "decision_log": {"enabled": False}, "reload": {"watch": False}, "tokens": TOKENS,
            "servers": {"tok": {"upstream": "127.0.0.1:9", "oauth2": {
                "token_url": tokens.url, "client_id": "fleet", "client_secret": "s"}}},
        }
        path = workdir / f"sidecar-{size}.yaml"
        path.write_text(yaml.safe_dump(config))
        try:
            log = (workdir / f"sidecar-{size}.log").open("wb")
            sidecar = subprocess.Popen([sys.executable, "-m", "ext_authz", "serve", "--config",
                                        str(path)], stdout=log, stderr=log)
            processes.append(sidecar)
            _until(lambda: _ready(admin), 30)
            admins = []
            loaded = load_config(path)
            for index in range(size):
                envoy_admin = free_port()
                bootstrap = build_bootstrap(
                    loaded, {}, listen=HostPort("127.0.0.1", free_port()),
                    admin=HostPort("127.0.0.1", envoy_admin),
                    sidecar=HostPort("127.0.0.1", grpc), data_path="native",
                    node_id=f"bench-{index}")
                file = workdir / f"envoy-{size}-{index}.yaml"
                file.write_text(render(bootstrap))
                processes.append(subprocess.Popen(
                    [envoy_binary(), "-c", str(file), "--concurrency", "1",
                     "--disable-hot-restart", "-l", "error"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                admins.append(envoy_admin)
            for envoy_admin in admins:
                _until(lambda a=envoy_admin: _lists(a, "mcp_tok"), 30)
            time.sleep(TOKEN_S)  # settled: every Envoy has taken a token
            posts, cpu = tokens.count, _cpu(sidecar.pid)
            time.sleep(idle_s)
            refreshes = max(1, tokens.count - posts)
            per_refresh = (_cpu(sidecar.pid) - cpu) / refreshes
            config["servers"]["extra"] = {"upstream": "127.0.0.1:9"}
            path.write_text(yaml.safe_dump(config))
            cpu, sent = _cpu(sidecar.pid), time.monotonic()
            sidecar.send_signal(signal.SIGHUP)
            for envoy_admin in admins:
                _until(lambda a=envoy_admin: _lists(a, "mcp_extra"), 60)
            reach = time.monotonic() - sent  # by when every Envoy had it (polled in turn)
            reload_cpu = _cpu(sidecar.pid) - cpu
            return {"refresh_cpu_s": per_refresh, "reload_cpu_s": reload_cpu,
                    "reload_reach_s": reach, "refreshes": refreshes}
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                process.wait(10)


def _ready(admin: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,8,16", help="fleet sizes, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="two small fleets (CI)")
    args = parser.parse_args()
    sizes = [1, 2] if args.smoke else [int(size) for size in args.sizes.split(",")]
    idle_s = 3.0 if args.smoke else 12.0
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-fleet-"))
    results = {size: measure(size, idle_s, workdir) for size in sizes}
    print(f"one sidecar, native Envoys, {TOKEN_S} s tokens; logs in {workdir}")
    print(f"{'Envoys':>8}{'CPU/refresh':>14}{'CPU/reload':>13}{'reload reaches all':>21}")
    for size, result in results.items():
        print(f"{size:>8}{result['refresh_cpu_s']:>12.3f} s{result['reload_cpu_s']:>11.3f} s"
              f"{result['reload_reach_s']:>19.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
