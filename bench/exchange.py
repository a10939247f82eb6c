"""What per-user tokens cost (RFC 8693 token exchange), against client credentials, through
Envoy in both data paths.

    python bench/exchange.py            # about a minute
    python bench/exchange.py --smoke    # proves it runs (CI; no figures to read)

One sidecar with two servers, `m2m` (oauth2: the gateway's own token) and `user`
(token_exchange), the tests' RFC 8693 token endpoint (in this process), and two Envoys
from `envoy-config`: the ext_authz data path, and the native one (the sidecar its control
plane). The upstream is an Envoy direct_response. wrk (one thread, 16 connections) GETs:
  client credentials   /mcp/m2m: the held token (ext_authz: the sidecar sets it; native:
                       Envoy's credential injector, the sidecar never asked)
  exchange, held       /mcp/user with one user's token: jwt_authn verifies it, the sidecar
                       reads the subject and serves the exchanged token it holds
  exchange, new user   /mcp/user with a token of a user never seen: every request is an
                       exchange (a round trip to the token endpoint)
The callers' tokens are ES256 JWTs signed here (jwt_authn checks each; the JWKS is a file).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hidden import _upstream  # noqa: E402
from run import PY, Result, ensure_tools, free_port, median, ratio, wrk  # noqa: E402

from ext_authz.demo import ProcessGroup, envoy_binary  # noqa: E402
from tests.token_endpoint import ThreadedTokenEndpoint  # noqa: E402

ISSUER, AUDIENCE = "https://login.bench", "gateway"
CONNECTIONS = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Users:
    """ES256 tokens of as many users as asked, and the JWKS that verifies them."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "bench",
                          "x": _b64(numbers.x.to_bytes(32, "big")),
                          "y": _b64(numbers.y.to_bytes(32, "big"))}]}

    def token(self, sub: str) -> str:
        now = int(time.time())
        head = _b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "bench"}).encode())
        body = _b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now,
                                "exp": now + 3600}).encode())
        r, s = decode_dss_signature(self.key.sign(f"{head}.{body}".encode(),
                                                  ec.ECDSA(hashes.SHA256())))
        return f"{head}.{body}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass
class Ports:
    upstream: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    grpc_admin: int = field(default_factory=free_port)
    envoys: dict[str, tuple[int, int]] = field(default_factory=lambda: {
        mode: (free_port(), free_port()) for mode in ("ext_authz", "native")})


def sidecar_config(p: Ports, token_url: str, jwks: Path) -> dict[str, Any]:
    client = {"token_url": token_url, "client_id": "bench", "client_secret": "bench-secret"}
    upstream = f"127.0.0.1:{p.upstream}"
    return {
        "grpc": {"listen": f"127.0.0.1:{p.grpc}"},
        "admin": {"listen": f"127.0.0.1:{p.grpc_admin}"},
        "reload": {"watch": False},
        "decision_log": {"enabled": False},
        "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)},
        "servers": {
            "m2m": {"upstream": upstream, "oauth2": client},
            "user": {"upstream": upstream, "token_exchange": {**client, "audience": "api"}},
        },
    }


@contextmanager
def stack(workdir: Path, users: Users) -> Iterator[tuple[Ports, Any]]:
    ports = Ports()
    procs = ProcessGroup(workdir)
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps(users.jwks()))
    with ThreadedTokenEndpoint() as endpoint:
        try:
            path = workdir / "sidecar.yaml"
            path.write_text(yaml.safe_dump(sidecar_config(ports, endpoint.url, jwks)))
            procs.start("sidecar", [PY, "-m", "ext_authz", "--log-level", "WARNING", "serve",
                                    "--config", str(path)])
            procs.wait_http("sidecar", f"http://127.0.0.1:{ports.grpc_admin}/readyz")
            for mode, (listen, admin) in ports.envoys.items():
                bootstrap = yaml.safe_load(subprocess.run(
                    [PY, "-m", "ext_authz", "envoy-config", "--config", str(path),
                     "--data-path", mode, "--listen", f"127.0.0.1:{listen}",
                     "--admin", f"127.0.0.1:{admin}"],
                    capture_output=True, text=True, check=True, timeout=60).stdout)
                if mode == "ext_authz":
                    bootstrap["static_resources"]["listeners"].append(_upstream(ports.upstream))
                envoy_yaml = workdir / f"envoy-{mode}.yaml"
                envoy_yaml.write_text(yaml.safe_dump(bootstrap))
                procs.start(f"envoy-{mode}", [str(envoy_binary()), "-c", str(envoy_yaml),
                                              "--concurrency", "1", "--disable-hot-restart",
                                              "-l", "warning"])
                procs.wait_http(f"envoy-{mode}", f"http://127.0.0.1:{admin}/ready")
            for mode, (listen, _) in ports.envoys.items():  # native: ADS, and the watchdog
                procs.wait_http(f"envoy-{mode}", f"http://127.0.0.1:{listen}/mcp/m2m/x")
            yield ports, endpoint
        finally:
            procs.stop()


def token_script(workdir: Path, name: str, tokens: list[str]) -> Path:
    """A wrk script sending each request with the next token of the list (one thread)."""
    listing = workdir / f"{name}.tokens"
    listing.write_text("\n".join(tokens) + "\n")
    script = workdir / f"{name}.lua"
    script.write_text(
        "local tokens = {}\n"
        f'for line in io.lines("{listing}") do tokens[#tokens + 1] = line end\n'
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #tokens + 1\n"
        "  return wrk.format(nil, nil, {Authorization = 'Bearer ' .. tokens[i]})\n"
        "end\n")
    return script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every measurement, interleaved; report medians")
    parser.add_argument("--smoke", action="store_true", help="1 s, one round (CI)")
    args = parser.parse_args()
    duration, rounds = (1.0, 1) if args.smoke else (args.duration, args.rounds)
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="mcp-ext-authz-exchange-"))
    users = Users()
    # More fresh users than the new-user runs can send (each request is one of them).
    fresh = [users.token(f"user-{n}") for n in range(int(6000 * duration * rounds) + 1000)]
    held = token_script(workdir, "held", [users.token("held")])
    cases = [("ext_authz", "client credentials", "m2m", None),
             ("ext_authz", "exchange, held", "user", held),
             ("ext_authz", "exchange, new user", "user", None),
             ("native", "client credentials", "m2m", None),
             ("native", "exchange, held", "user", held)]
    results: dict[tuple[str, str], list[Result]] = {(m, c): [] for m, c, _, _ in cases}
    exchanged = 0
    with stack(workdir, users) as (ports, endpoint):
        sent = 0
        for round_ in range(rounds):
            for mode, case, server, script in cases:
                url = f"http://127.0.0.1:{ports.envoys[mode][0]}/mcp/{server}/x"
                if case == "exchange, new user":
                    script = token_script(workdir, f"fresh-{round_}", fresh[sent:])
                    before = sum(endpoint.exchanges.values())
                result = wrk(url, CONNECTIONS, duration, script, threads=1)
                if case == "exchange, new user":
                    sent += int(result.rps * duration) + CONNECTIONS * 4
                    exchanged += sum(endpoint.exchanges.values()) - before
                results[(mode, case)].append(result)
    print(f"through Envoy: wrk, 1 thread, {CONNECTIONS} connections, {rounds} interleaved"
          f" round(s) of {duration:.0f} s (medians)")
    print(f"{'':34}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   vs client credentials")
    for mode, case, _, _ in cases:
        got = median(results[(mode, case)])
        base = median(results[(mode, "client credentials")])
        print(f"  {mode:10}{case:22}{got.rps:8.0f}{got.p50_ms:9.2f}{got.p99_ms:9.2f}"
              f"{got.errors:8d}   {ratio(got.rps, base.rps)} req/s,"
              f" +{got.p50_ms - base.p50_ms:.2f} ms p50")
    print(f"exchanges the token endpoint made in the new-user runs: {exchanged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
