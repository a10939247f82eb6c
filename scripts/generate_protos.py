"""Regenerate the committed protobuf and gRPC stubs in ext_authz/_proto/ from protos/.

Run `python scripts/generate_protos.py` after editing a .proto file;
`python scripts/generate_protos.py --check` exits 1 when the committed stubs differ
from a fresh generation (tests/test_protos.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "ext_authz" / "_proto"
OUT_PACKAGE = "ext_authz._proto"

# Upstream Envoy protos import each other as `envoy.x.y`; the stubs live under
# ext_authz._proto so they can never clash with another copy of Envoy's API.
_ENVOY_IMPORT = re.compile(r"^(from|import) envoy\.", re.MULTILINE)


def _include_dirs() -> list[str]:
    import google.rpc  # googleapis-common-protos ships google/rpc/status.proto
    import grpc_tools

    well_known = importlib.resources.files(grpc_tools) / "_proto"
    googleapis_root = Path(next(iter(google.rpc.__path__))).parent.parent
    return [str(PROTO_DIR), str(well_known), str(googleapis_root)]


def generate(out_dir: Path) -> None:
    """Write fresh stubs for every .proto under protos/ into out_dir."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += protos
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in sorted(out_dir.rglob("*.py*")):
        text = path.read_text()
        path.write_text(_ENVOY_IMPORT.sub(rf"\1 {OUT_PACKAGE}.envoy.", text))
    for directory in [out_dir, *sorted(p for p in out_dir.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def differences(committed: Path, fresh: Path) -> list[str]:
    """Name every file that is missing, extra or different between two stub trees."""
    a, b = _tree(committed), _tree(fresh)
    problems = [f"missing: {name}" for name in sorted(b.keys() - a.keys())]
    problems += [f"not generated: {name}" for name in sorted(a.keys() - b.keys())]
    problems += [
        f"differs: {name}"
        for name in sorted(a.keys() & b.keys())
        if not filecmp.cmp(a[name], b[name], shallow=False)
    ]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            problems = differences(OUT_DIR, fresh)
            for problem in problems:
                print(problem, file=sys.stderr)
            return 1 if problems else 0
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        shutil.copytree(fresh, OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
