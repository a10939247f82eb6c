"""What a principal or a JWT-claim rule costs per check, against a CIDR rule, in process.

    python bench/identity.py            # about 10 seconds
    python bench/identity.py --smoke    # proves it runs (CI)

Each check is the live path's own steps: the CheckRequest bytes parsed, the facts (and the
identity) read from it, the decision, the answer encoded. Three configs differ only in how
`billing`'s partner network is named: by CIDR, by a SPIFFE principal pattern, by a JWT
claim; each request is one that rule lets in. "warm" repeats one request (the decision
cache answers, as for a busy caller); "cold" clears the cache before each check (the whole
placement runs). Measured side by side, interleaved, median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from body import per_call_us  # bench/, beside this script
from google.protobuf import json_format, struct_pb2

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2
from ext_authz.contract import JWT_FILTER
from ext_authz.edges.check_request import extract_facts
from ext_authz.edges.check_response import encode_check_response
from ext_authz.policy.compile import Policy
from ext_authz.policy.config import parse_config
from ext_authz.policy.decision import decide

PARTNER_IP, CALLER_IP = "203.0.113.7", "198.51.100.9"
AGENT = "spiffe://cluster.local/ns/partners/sa/agent"
NETWORKS = {
    "cidr": {"cidrs": ["203.0.113.0/24"]},
    "principal": {"principals": ["spiffe://cluster.local/ns/partners/sa/*"]},
    "claim": {"jwt_claims": {"group": "partners"}},
}


def policy(rule: str) -> Policy:
    return Policy.from_config(parse_config({
        "network": {"internal_ranges": ["10.0.0.0/8"], "networks": {
            "partners": NETWORKS[rule]}},
        "jwt": {"issuer": "https://idp.example", "jwks_file": "/jwks.json"},
        "servers": {"billing": {"available_on_public_internet": False,
                                "visible_to": ["partners"]}},
    }, env={}))


def request(rule: str) -> bytes:
    check = external_auth_pb2.CheckRequest()
    attributes = check.attributes
    source = attributes.source
    source.address.socket_address.address = PARTNER_IP if rule == "cidr" else CALLER_IP
    source.address.socket_address.port_value = 40000
    http = attributes.request.http
    http.method, http.path, http.host = "POST", "/mcp/billing", "gw.example"
    http.headers["content-type"] = "application/json"
    attributes.context_extensions["mcp_server"] = "billing"
    if rule == "principal":
        source.principal = AGENT
    if rule == "claim":
        payload = json_format.ParseDict({"mcp_ext_authz": {
            "iss": "https://idp.example", "sub": "someone", "aud": "mcp-gateway",
            "group": ["staff", "partners"], "exp": 4102444800}}, struct_pb2.Struct())
        attributes.metadata_context.filter_metadata[JWT_FILTER].CopyFrom(payload)
    return check.SerializeToString()


def check(data: bytes, compiled: Policy, cold: bool) -> bytes:
    if cold:
        compiled.decision_cache.clear()
    facts = extract_facts(external_auth_pb2.CheckRequest.FromString(data), compiled)
    decision = decide(facts, compiled)
    assert decision.allowed, decision
    return encode_check_response(decision, None, "bench-1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    args = parser.parse_args()
    seconds, rounds = (0.02, 1) if args.smoke else (args.seconds, args.rounds)
    runs: dict[tuple[str, bool], Callable[[], Any]] = {}
    for rule in NETWORKS:
        compiled, data = policy(rule), request(rule)
        for cold in (False, True):
            runs[(rule, cold)] = (
                lambda data=data, compiled=compiled, cold=cold: check(data, compiled, cold))
    samples: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, function in runs.items():
            samples[key].append(per_call_us(function, seconds))
    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(f"{'rule':<12}{'warm µs':>9}{'vs cidr':>9}{'cold µs':>9}{'vs cidr':>9}")
    for rule in NETWORKS:
        warm, cold = medians[(rule, False)], medians[(rule, True)]
        print(f"{rule:<12}{warm:>9.2f}{warm / medians[('cidr', False)]:>8.2f}x"
              f"{cold:>9.2f}{cold / medians[('cidr', True)]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
