"""What judging every answer by what it is costs, per message, in process, side by side.

    python bench/answers.py            # about 20 seconds
    python bench/answers.py --smoke    # proves it runs (CI)

Issue #24 reads every server-to-client message on a route with rules, whichever exchange
carries it, and puts back any sealed fresh name. Timed here, interleaved, on the real
answers filter code (edges/answers.Answer.text):
  pass        what a message costs when it is not read at all (the floor: a bytes copy)
  any         a ping's answer on the route: looked at for a list or a sealed name, not parsed
  call        a hidden tool's answer, its sealed name put back
  list        a tools/list of 3 (one hidden), parsed and filtered
  list 200    a tools/list of 200 tools (20 hidden)
and on the request side, what ext_proc does for a tools/call once the body is read
(judge_items, then every use sealed and spliced alike), for a hidden name against a missing
one, with and without a "*" rule: the medians should agree.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ext_authz.edges.answers import Answer
from ext_authz.mcp.jsonrpc import request_body
from ext_authz.mcp.rewrite import rename
from ext_authz.mcp.seal import Sealer
from ext_authz.policy.compile import Policy
from ext_authz.policy.config import parse_yaml
from ext_authz.policy.decision import RequestFacts, decide, judge_items

SEALER = Sealer(b"bench-key-bench-key-bench-key-00")
HIDDEN = {"available_on_public_internet": False}


def policy(star: bool) -> Policy:
    tools = {"add": HIDDEN, **({"*": HIDDEN, "whoami": {}} if star else {})}
    config = {"network": {"internal_ranges": ["10.0.0.0/8"]},
              "servers": {"s": {"upstream": "127.0.0.1:1", "tools": tools}}}
    return Policy.from_config(parse_yaml(json.dumps(config), env={}))


def _listing(count: int, hidden_every: int) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"tools": [
        {"name": "add" if i % hidden_every == 0 else f"tool{i}",
         "description": f"The tool number {i}.",
         "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}}}}
        for i in range(count)]}}, separators=(",", ":"))


ANSWERS = {
    "any": '{"jsonrpc":"2.0","id":7,"result":{}}',
    "call": json.dumps({"jsonrpc": "2.0", "id": 8, "result": {"content": [
        {"type": "text", "text": f"Unknown tool: {SEALER.fresh('tool', 'add')}"}],
        "isError": True}}, separators=(",", ":")),
    "list": _listing(3, 3),
    "list 200": _listing(200, 10),
}


def answer_costs() -> dict[str, Callable[[], object]]:
    placement = decide(RequestFacts("203.0.113.9", None, "/mcp/s", "gw"), policy(False))
    assert placement.server is not None
    visible = functools.partial(placement.server.item_visible, placement=placement.placement)
    answer = Answer(SEALER, visible, 1 << 24, kind="any")
    costs: dict[str, Callable[[], object]] = {
        "pass": functools.partial(bytes, ANSWERS["any"].encode())}
    for name, text in ANSWERS.items():
        costs[name] = functools.partial(answer.text, text)
    restored = answer.text(ANSWERS["call"])
    assert restored is not None
    assert "hidden-" not in restored
    assert '"add"' not in (answer.text(ANSWERS["list"]) or "")
    return costs


def request_costs() -> dict[str, Callable[[], object]]:
    costs: dict[str, Callable[[], object]] = {}
    for star in (False, True):
        compiled = policy(star)
        server = decide(RequestFacts("203.0.113.9", None, "/mcp/s", "gw"), compiled)
        for tool in ("add", "zzz"):
            data = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": tool, "arguments": {"a": 1, "b": 2}}})
            body = request_body(data.encode(), "POST", {"content-type": ["application/json"]})

            def judge(body: object = body, data: str = data, compiled: Policy = compiled,
                      server: object = server) -> object:
                judged = judge_items(server, body, compiled, can_rename=True)  # type: ignore[arg-type]
                paths = {use.at: SEALER.fresh(use.kind, use.name) if hidden else None
                         for use, hidden in zip(judged.uses, judged.hidden, strict=True)}
                return rename(data, paths) if paths else data

            costs[f"{'with' if star else 'without'} \"*\": {tool}"] = judge
    return costs


def measure(costs: dict[str, Callable[[], object]], rounds: int, number: int
            ) -> dict[str, float]:
    """Median microseconds per call of each, the rounds interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in costs}
    for _ in range(rounds):
        for name, cost in costs.items():
            started = time.perf_counter()
            for _ in range(number):
                cost()
            samples[name].append((time.perf_counter() - started) / number * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short round (CI)")
    args = parser.parse_args()
    rounds, number = (1, 20) if args.smoke else (15, 2000)
    answers = measure(answer_costs(), rounds, number)
    print(f"answers filter, per message (median of {rounds} interleaved rounds)")
    for name, micros in answers.items():
        print(f"  {name:<10}{micros:>9.2f} µs   {micros / answers['pass']:>7.1f}x pass")
    requests = measure(request_costs(), rounds, number)
    print("ext_proc on a tools/call once the body is read: judged, sealed, spliced")
    for name, micros in requests.items():
        print(f"  {name:<22}{micros:>9.2f} µs")
    for star in ("without", "with"):
        ratio = requests[f'{star} "*": add'] / requests[f'{star} "*": zzz']
        print(f'  hidden / missing, {star} "*": {ratio:.3f}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
