"""Soak: steady load through Envoy while tokens live a few seconds and refresh constantly.

    python bench/soak.py --minutes 3 [--rate 300]     # at most 10 minutes

The token endpoint issues tokens that expire after --token-lifetime seconds; the upstream
(in the same process) accepts a request only if its bearer token was issued by that endpoint
and has not yet expired. The run fails on any non-200 answer, any expired or unknown token
reaching the upstream, or resident memory of the sidecar growing by more than --max-rss-growth.
Load comes from h2load at a fixed rate, bounded by --minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import ensure_tools, free_port  # noqa: E402
from ext_authz.demo import ProcessGroup, envoy_binary  # noqa: E402
from ext_authz.policy.config import UpstreamAddress, parse_yaml  # noqa: E402
from ext_authz.render.bootstrap import build_bootstrap, render  # noqa: E402
from ext_authz.render.options import HostPort  # noqa: E402


class TokenAuthority:
    """Token endpoint and verifying upstream, sharing the list of issued tokens."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self.issued: dict[str, float] = {}  # token -> expiry (monotonic)
        self.counts = {"issued": 0, "ok": 0, "expired": 0, "unknown": 0, "missing": 0}

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return lines[0], headers, body

    async def token_endpoint(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._read(reader)
                token = secrets.token_urlsafe(24)
                self.issued[token] = time.monotonic() + self.lifetime_s
                self.counts["issued"] += 1
                body = json.dumps({"access_token": token, "token_type": "Bearer",
                                   "expires_in": self.lifetime_s}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, headers, _ = await self._read(reader)
                token = headers.get("authorization", "").removeprefix("Bearer ")
                expiry = self.issued.get(token)
                if not token:
                    verdict = "missing"
                elif expiry is None:
                    verdict = "unknown"
                elif time.monotonic() >= expiry:
                    verdict = "expired"
                else:
                    verdict = "ok"
                self.counts[verdict] += 1
                status = b"200 OK" if verdict == "ok" else b"401 Unauthorized"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=300, help="requests per second")
    parser.add_argument("--token-lifetime", type=float, default=4.0, help="expires_in, s")
    parser.add_argument("--max-rss-growth", type=float, default=0.10,
                        help="fail if the sidecar's RSS grows by more than this fraction")
    args = parser.parse_args()
    minutes = min(args.minutes, 10.0)  # bounded, whatever is asked
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-soak-"))
    authority = TokenAuthority(args.token_lifetime)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    token_port, upstream_port = free_port(), free_port()

    async def serve() -> None:
        await asyncio.start_server(authority.token_endpoint, "127.0.0.1", token_port)
        await asyncio.start_server(authority.upstream, "127.0.0.1", upstream_port)

    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    grpc, admin, envoy_port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    sidecar_yaml = f"""
grpc: {{listen: 127.0.0.1:{grpc}}}
admin: {{listen: 127.0.0.1:{admin}}}
decision_log: {{path: {workdir}/decisions.jsonl, sample_allowed: 0.01}}
tokens: {{expiry_buffer_s: 1, min_ttl_s: 1, retry_initial_s: 0.1, retry_max_s: 1}}
servers:
  soak:
    oauth2:
      token_url: http://127.0.0.1:{token_port}/token
      client_id: soak
      client_secret: soak-secret
"""
    (workdir / "sidecar.yaml").write_text(sidecar_yaml)
    config = parse_yaml(sidecar_yaml)
    (workdir / "envoy.yaml").write_text(render(build_bootstrap(
        config, {"soak": UpstreamAddress("127.0.0.1", upstream_port)},
        listen=HostPort("127.0.0.1", envoy_port), admin=HostPort("127.0.0.1", envoy_admin),
        sidecar=HostPort("127.0.0.1", grpc))))
    procs = ProcessGroup(workdir)
    try:
        sidecar = procs.start("sidecar", [sys.executable, "-m", "ext_authz", "serve",
                                          "--config", str(workdir / "sidecar.yaml")])
        procs.wait_http("sidecar", f"http://127.0.0.1:{admin}/readyz")
        procs.start("envoy", [str(envoy_binary()), "-c", str(workdir / "envoy.yaml"),
                              "--concurrency", "1", "--disable-hot-restart", "-l", "warning"])
        procs.wait_http("envoy", f"http://127.0.0.1:{envoy_admin}/ready")
        deadline = time.monotonic() + 30
        while subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{envoy_port}/mcp/soak"],
                             capture_output=True, text=True).stdout != "200":
            if time.monotonic() > deadline:
                raise RuntimeError("stack did not answer 200")
            time.sleep(0.2)
        start_rss = rss_kib(sidecar.pid)
        samples: list[tuple[float, int]] = [(0.0, start_rss)]
        clients = 10
        load = subprocess.Popen(
            ["h2load", "--h1", "-c", str(clients), "--rps", str(args.rate // clients),
             "-D", str(int(minutes * 60)), f"http://127.0.0.1:{envoy_port}/mcp/soak"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        while load.poll() is None:
            time.sleep(10)
            samples.append((time.monotonic() - started, rss_kib(sidecar.pid)))
        out = load.communicate()[0]
        end_rss = rss_kib(sidecar.pid)
    finally:
        procs.stop()
        loop.call_soon_threadsafe(loop.stop)
    summary: dict[str, Any] = {
        "minutes": minutes,
        "rate": args.rate,
        "token_lifetime_s": args.token_lifetime,
        "h2load": [line for line in out.splitlines() if line.startswith(("requests:",
                                                                            "status codes:"))],
        "upstream": authority.counts,
        "rss_kib": {"start": start_rss, "end": end_rss,
                    "samples": [s for _, s in samples]},
    }
    print(json.dumps(summary, indent=2))
    failures = []
    counts = authority.counts
    if counts["expired"] or counts["unknown"] or counts["missing"]:
        failures.append(f"bad tokens reached the upstream: {counts}")
    non_200 = [line for line in out.splitlines() if line.startswith("status codes:")]
    if non_200 and not all(" 0 3xx, 0 4xx, 0 5xx" in line for line in non_200):
        failures.append(f"non-200 answers: {non_200}")
    if "0 failed, 0 errored, 0 timeout" not in out:
        failures.append("h2load saw failed requests")
    # Compare with the RSS after the first minute of load (warm-up allocations done).
    baseline = samples[min(6, len(samples) - 1)][1]
    if end_rss > baseline * (1 + args.max_rss_growth):
        failures.append(f"RSS grew from {baseline} KiB to {end_rss} KiB")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print("soak: " + ("FAILED" if failures else "ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1")
    sys.exit(main())
