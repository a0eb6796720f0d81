"""Generate the Python gRPC modules from proto/ reproducibly (`make proto`).

`-Idisagg/rpc=proto` maps proto/ onto this package, so the generated modules
import each other as `disagg.rpc.*` with no hand-editing. The generator is
pinned (grpcio-tools in the dev extras), so the output is byte-for-byte stable
and a test can tell when the committed files are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write `<out_root>/disagg/rpc/*_pb2*.py(i)` and return the written paths."""
    from grpc_tools import protoc

    (out_root / "disagg" / "rpc").mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{protoc_include()}",
            f"-Idisagg/rpc={PROTO_DIR}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"disagg/rpc/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted((out_root / "disagg" / "rpc").glob("*_pb2*.py*"))


def protoc_include() -> str:
    """grpc_tools' bundled well-known types (google/protobuf/*.proto)."""
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT), file=sys.stderr)
