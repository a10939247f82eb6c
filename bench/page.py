"""What the status page costs the admin listener under load: /metrics latency with no page,
with the page open (what its script asks every 2 s), and with the page's JSON asked as fast
as one client can, side by side in interleaved rounds, while Checks keep the sidecar busy.

    python bench/page.py            # about a minute
    python bench/page.py --smoke    # proves it runs (CI; no figures to read)

The sidecar is a subprocess (its own event loop, as in production); Checks come from two
threads over gRPC, bounded in count and time; /metrics is asked every 20 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: E402
from tests.e2e.harness import free_port  # noqa: E402
from tests.test_service import check_request  # noqa: E402
from tests.token_endpoint import ThreadedTokenEndpoint  # noqa: E402

MODES = ("no page", "page open", "page JSON flat out")
PAGE_EVERY_S = 2.0  # page.js's REFRESH_MS


def _load(grpc_port: int, stop: threading.Event, limit: int) -> None:
    requests = [check_request(peer=peer, path=path) for peer, path in (
        ("203.0.113.9", "/mcp/pub"), ("10.1.2.3", "/mcp/crm"), ("198.51.100.7", "/mcp/crm"),
        ("203.0.113.9", "/mcp/nope"))]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for sent in range(limit):
            if stop.is_set():
                return
            stub.Check(requests[sent % len(requests)], timeout=5)


def _page(base: str, mode: str, stop: threading.Event, limit: int) -> None:
    with httpx.Client(base_url=base, timeout=5) as http:
        if mode == "page open":
            for path in ("/", "/page.js", "/page.css"):
                http.get(path)
        for _ in range(limit):
            if stop.is_set():
                return
            http.get("/api/status")
            http.get("/api/decisions")
            if mode == "page open":
                stop.wait(PAGE_EVERY_S)


def _round(base: str, grpc_port: int, mode: str, seconds: float) -> list[float]:
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(grpc_port, stop, 200_000))
               for _ in range(2)]
    if mode != "no page":
        workers.append(threading.Thread(target=_page, args=(base, mode, stop, 100_000)))
    for worker in workers:
        worker.start()
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=5) as http:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            http.get("/metrics").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    stop.set()
    for worker in workers:
        worker.join(30)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short round each (CI)")
    args = parser.parse_args()
    rounds, seconds = (1, 1.0) if args.smoke else (4, 5.0)
    ports = {"grpc": free_port(), "admin": free_port()}
    with ThreadedTokenEndpoint() as tokens, tempfile.TemporaryDirectory() as workdir:
        config: dict[str, Any] = {
            "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
            "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
            "network": {"internal_ranges": ["10.0.0.0/8"],
                        "networks": {"partners": ["198.51.100.0/24"]}},
            "decision_log": {"enabled": False},
            "servers": {
                "pub": {"tools": {"delete": {"available_on_public_internet": False}}},
                "crm": {"available_on_public_internet": False, "visible_to": ["partners"],
                        "oauth2": {"token_url": tokens.url, "client_id": "c",
                                   "client_secret": "s"}}},
        }
        path = Path(workdir) / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        sidecar = subprocess.Popen([sys.executable, "-m", "ext_authz", "serve", "--config",
                                    str(path)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{ports['admin']}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the sidecar did not get ready")
                time.sleep(0.1)
            found: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(rounds):  # interleaved: drift hits every mode alike
                for mode in MODES:
                    found[mode] += _round(base, ports["grpc"], mode, seconds)
        finally:
            sidecar.terminate()
            sidecar.wait(10)
    base_p50 = statistics.median(found["no page"])
    print(f"/metrics latency under Check load, {rounds} interleaved rounds of {seconds:g} s")
    print(f"{'mode':<20} {'asks':>6} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs no page':>15}")
    for mode, latencies in found.items():
        ordered = sorted(latencies)
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(f"{mode:<20} {len(ordered):>6} {p50 * 1000:>8.2f} {p99 * 1000:>8.2f}"
              f" {p50 / base_p50:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
