"""The committed generated gRPC code must be exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "protos" / "edgeloop" / "v1"


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = tmp_path / "protos" / "edgeloop" / "v1"
    generated = sorted(p.name for p in fresh.glob("*_pb2*"))
    assert generated, "protoc produced nothing"
    committed = sorted(p.name for p in GEN.glob("*_pb2*"))
    assert committed == generated, "generated files differ from the committed set; run scripts/gen_protos.py"
    for name in generated:
        assert (GEN / name).read_bytes() == (fresh / name).read_bytes(), (
            f"{name} is stale: run `python scripts/gen_protos.py` and commit the result")


def test_every_rpc_has_its_own_request_and_response() -> None:
    from protos.edgeloop.v1 import fleet_pb2

    service = fleet_pb2.DESCRIPTOR.services_by_name["EdgeFleet"]
    names = {m.name for m in service.methods}
    assert {"Register", "Heartbeat", "UploadSamples", "GetUpdate", "WatchUpdates"} <= names
    for m in service.methods:
        assert m.input_type.name == f"{m.name}Request"
        assert m.output_type.name == f"{m.name}Response"
    upload = service.methods_by_name["UploadSamples"]
    assert upload.client_streaming and not upload.server_streaming
    assert service.methods_by_name["GetUpdate"].server_streaming
    assert service.methods_by_name["WatchUpdates"].server_streaming
