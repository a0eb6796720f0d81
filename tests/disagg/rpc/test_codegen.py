from __future__ import annotations

from disagg.rpc import codegen


def test_generated_grpc_code_is_fresh(tmp_path):
    """Fails when proto/ changed but `make proto` was not run (or the output was hand-edited)."""
    generated = codegen.generate(tmp_path)
    assert generated, "no proto files were generated"
    committed_dir = codegen.ROOT / "disagg" / "rpc"
    for path in generated:
        committed = committed_dir / path.name
        assert committed.exists(), f"{path.name} is not committed; run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{path.name} is stale; run `make proto`"
        )
    committed_names = {p.name for p in committed_dir.glob("*_pb2*.py*")}
    assert committed_names == {p.name for p in generated}, "stale generated files; run `make proto`"
