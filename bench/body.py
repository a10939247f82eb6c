"""What reading a tool-rule body costs in process, against what the reader did before.

    python bench/body.py            # about 10 seconds
    python bench/body.py --smoke    # proves it runs (CI)

Before issue #14 the reader scanned a body for `tools/call` and parsed only a body that
might be one (json.loads with a duplicate-key hook). Now every body is parsed and its
envelope and params keys checked against Go's folding, its Content-Type and MCP headers
compared. Both are timed here side by side, interleaved, in one process: the old paths are
reproduced in a few lines below (they are that small), the new one is the real reader.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_authz.mcp.jsonrpc import read_item_uses, request_body

HEADERS = {"content-type": ["application/json"], "mcp-method": ["tools/call"],
           "mcp-name": ["add"]}
BODIES = {
    "tools/call": json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                              "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}),
    "tools/list": json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    "tools/call 16 KiB": json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                     "params": {"name": "add", "arguments": {
                                         f"k{i}": "v" * 100 for i in range(150)}}}),
}


def _unique(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def before(data: bytes) -> Any:
    """The previous reader's work: a byte scan, then a parse only of a possible tools/call."""
    if b"tools/call" not in data and b"\\" not in data and b"\x00" not in data:
        return None
    return json.loads(data.decode("utf-8"), object_pairs_hook=_unique)


def now(data: bytes, headers: dict[str, list[str]]) -> Any:
    return read_item_uses(request_body(data, "POST", headers), 1 << 20, 32)


def per_call_us(function: Callable[[], Any], seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            function()
        count += 200
    return (time.perf_counter() - started) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    args = parser.parse_args()
    seconds, rounds = (0.02, 1) if args.smoke else (args.seconds, args.rounds)
    print(f"{'body':<20}{'before µs':>10}{'now µs':>9}{'now, MCP headers':>18}{'ratio':>8}")
    json_only = {"content-type": ["application/json"]}
    for name, text in BODIES.items():
        data = text.encode()
        mcp = HEADERS if name.startswith("tools/call") else json_only
        runs: dict[str, Callable[[], Any]] = {
            "before": lambda data=data: before(data),  # type: ignore[misc]
            "now": lambda data=data: now(data, json_only),  # type: ignore[misc]
            "headers": lambda data=data, mcp=mcp: now(data, mcp),  # type: ignore[misc]
        }
        samples: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, function in runs.items():
                samples[key].append(per_call_us(function, seconds))
        old, new, with_headers = (statistics.median(samples[k]) for k in runs)
        print(f"{name:<20}{old:>10.1f}{new:>9.1f}{with_headers:>18.1f}{new / old:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
