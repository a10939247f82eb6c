"""The sidecar's hot path in two versions of the code, side by side in one run.

    python bench/versions.py --ref a2b38c3              # this tree vs that commit
    python bench/versions.py --ref a2b38c3 --smoke      # one short round

A refactoring must not cost the hot path anything. This starts one sidecar from this tree
and one from a git ref (its files exported to a temporary folder, never checked out here),
on the same config and token endpoint, and drives each with h2load speaking gRPC straight
to it (no Envoy in between: the sidecar's own cost, undiluted): the Check of a server with
an injected token, the Check that carries a tool-rule body (as under Istio), and the
ext_proc stream a tool-rule route opens (headers, then the body). Rounds alternate between
the versions; medians and this/ref ratios are printed. No thresholds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    CHECK,
    PROCESS,
    TOOLS_CALL,
    ensure_tools,
    ext_proc_body,
    free_port,
    grpc_body,
    h2load_grpc,
    sidecar_config,
)
from ext_authz.demo import ProcessGroup  # noqa: E402

PY = sys.executable
# The package from one tree, whatever the working folder or an editable install says.
_RUN = ("import runpy, sys; sys.path.insert(0, {tree!r}); import ext_authz;"
        " print(ext_authz.__file__, file=sys.stderr, flush=True);"
        " runpy.run_module('ext_authz', run_name='__main__')")
# A server with an injected token; a tool-rule body in the Check (Istio); an ext_proc stream.
LOADS = ("check", "check+body", "ext_proc")


def export(ref: str, into: Path) -> Path:
    """The package and its bench helpers as they are at `ref`, in a folder of their own."""
    archive = into / "ref.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive),
                    ref, "ext_authz"], check=True)
    tree = into / "ref"
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


class _Ports:
    """What bench.run's sidecar config needs of its ports: the token endpoint's."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ref", required=True, help="the git commit (or tag) to compare with")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--smoke", action="store_true", help="one short round")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 1.0, 1
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        workdir = Path(tmp)
        trees = {"this": ROOT, args.ref: export(args.ref, workdir)}
        procs = ProcessGroup(workdir)
        secret = {"DEMO_SECRET_DEMO_PUBLIC": secrets.token_urlsafe(16)}
        tokens = free_port()
        try:
            procs.start("tokens", [PY, "-m", "ext_authz.demo", "token-endpoint", "--port",
                                   str(tokens)], secret)
            ports = {}
            for name, tree in trees.items():
                grpc, admin = free_port(), free_port()
                config = workdir / f"sidecar-{grpc}.yaml"
                data = sidecar_config(_Ports(tokens), grpc, admin, workdir)  # type: ignore[arg-type]
                config.write_text(yaml.safe_dump(data))
                procs.start(f"sidecar-{grpc}", [PY, "-c", _RUN.format(tree=str(tree)),
                                                "--log-level", "WARNING", "serve", "--config",
                                                str(config)], secret)
                procs.wait_http(name, f"http://127.0.0.1:{admin}/readyz")
                ran = (workdir / f"sidecar-{grpc}.log").read_text().splitlines()[0]
                if not ran.startswith(str(tree)):
                    raise RuntimeError(f"{name}: the sidecar ran {ran}, not {tree}'s code")
                ports[name] = grpc
            bodies = {"check": grpc_body(workdir), "check+body": grpc_body(
                workdir, "tooled", TOOLS_CALL), "ext_proc": ext_proc_body(workdir)}
            runs: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for load in LOADS:
                    method = PROCESS if load == "ext_proc" else CHECK
                    for name, port in ports.items():
                        result = h2load_grpc(port, 1, 64, args.seconds, bodies[load], method)
                        if result.errors:
                            raise RuntimeError(f"{name} {load}: {result.errors} failed")
                        runs.setdefault((load, name), []).append(result.rps)
        finally:
            procs.stop()
    print(f"direct gRPC, c=1 m=64, {args.rounds} interleaved rounds of {args.seconds:g} s"
          " (median calls/s)")
    print(f"  {'':12} {'this':>10} {args.ref[:10]:>10}   this/ref")
    for load in LOADS:
        mine = statistics.median(runs[(load, "this")])
        theirs = statistics.median(runs[(load, args.ref)])
        print(f"  {load:12} {mine:10.0f} {theirs:10.0f}   {mine / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    sys.exit(main())
