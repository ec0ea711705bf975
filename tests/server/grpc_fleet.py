"""A real gRPC server (FleetServicer on a loopback port) and the request builders the gRPC tests
share."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.grpc_api.servicer import FleetServicer
from shared.samples import encode_sample, sample_id


class Fleet:
    """A running gRPC server (FleetServicer on 127.0.0.1:<free port>) and a client stub."""

    def __init__(self, ctx, **overrides) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.model_copy(update=overrides) if overrides else ctx.settings
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_EdgeFleetServicer_to_server(
            FleetServicer(self.settings, ctx.factory, ctx.blobs, ctx.targets_changed), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        assert self.port > 0
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.EdgeFleetStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)
        self.ctx.targets_changed.notify()  # wake watch handlers parked on the notifier

    def register(self, hardware_id: str = "hw-1", **kw) -> pb.RegisterResponse:
        return self.stub.Register(pb.RegisterRequest(
            enrollment_token=kw.pop("token", self.settings.enrollment_token), hardware_id=hardware_id, **kw),
            timeout=10)


def md(credential: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {credential}")]


def pb_sample(x: np.ndarray, label: int | None = None) -> pb.Sample:
    payload = encode_sample(x)
    s = pb.Sample(sample_id=sample_id(payload), payload=payload, captured_at_unix_ms=1_700_000_000_000)
    if label is not None:
        s.label = label
    return s


def stream(samples: list[pb.Sample], per_message: int = 8) -> Iterator[pb.UploadSamplesRequest]:
    for i in range(0, len(samples), per_message):
        yield pb.UploadSamplesRequest(samples=samples[i : i + per_message])
