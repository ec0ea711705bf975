"""Shared fixtures for the edge agent tests: a small real dataset, tiny real models, and the
server's real (async) gRPC server on a loopback port."""

from __future__ import annotations

import pytest
import torch

from shared.data import load_dataset
from shared.models import ArchSpec, build_model, init_weights_from_seed


@pytest.fixture
def one_torch_thread():
    """Torch intra-op threads only add contention for these small models on shared cores
    (and profiles measured with one thread are steadier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """UCI hand-written digits (1438 train images, 1x8x8 uint8): real sensor-like inputs."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_arch() -> ArchSpec:
    return ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,))


@pytest.fixture(scope="session")
def make_state(tiny_arch):
    """``make_state(seed)``: the seeded weights of ``tiny_arch`` (distinct seeds, distinct models)."""

    def make(seed: int) -> dict[str, torch.Tensor]:
        model = build_model(tiny_arch)
        init_weights_from_seed(model, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return make


class GrpcServer:
    """The agent gRPC server (AgentGrpcServer) of a server context on a fresh loopback port."""

    def __init__(self, ctx) -> None:
        from server.grpc_api.aio_server import AgentGrpcServer
        from tests.server.grpc_fleet import create_enrollment_token, harness_settings

        self.ctx = ctx
        self.server = AgentGrpcServer(ctx, harness_settings(ctx.settings, {}))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

        self.enrollment_token = create_enrollment_token(ctx)  # what agents of these tests present

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def signing_keys(self) -> list[bytes]:
        """The public keys the server sends at enrollment (what an enrolled agent pins)."""
        from server import signing
        from server.db.engine import transaction

        with transaction(self.ctx.factory) as s:
            return signing.trusted_public_keys(s)

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def start_grpc_server(server_ctx):
    """``start_grpc_server()``: another :class:`GrpcServer` on ``server_ctx`` (a restarted
    server gets a new port); every one started is stopped at teardown."""
    started: list[GrpcServer] = []

    def start() -> GrpcServer:
        started.append(GrpcServer(server_ctx))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(start_grpc_server) -> GrpcServer:
    """The fleet gRPC server of ``server_ctx`` (the test module's ``server_settings``)."""
    return start_grpc_server()


@pytest.fixture(scope="session")
def dress_model(digits):
    """A DRESS MLP (subnets 0.5/0.8/0.9/0.95) trained on digits, as the state dict a server
    would ship (about 1.5 s, once per session): ``arch``, ``state``, ``hash``, ``ds`` and each
    subnet's FLOPs-proxy ``energies`` (mJ)."""
    from edge_agent.governor import DEFAULT_PJ_PER_FLOP
    from shared.dress import DressConfig, subnet_flops, train_dress
    from shared.dress.model_state import plain_arch, store_dress_state, tables_from_state
    from shared.models import model_hash

    sparsities = (0.5, 0.8, 0.9, 0.95)
    arch = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64,),
                    extra={"dress": {"sparsities": list(sparsities), "gamma": 0.5}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = init_weights_from_seed(build_model(plain_arch(arch)), 0)
        res = train_dress(backbone, digits.x_train, digits.y_train, digits.x_test, digits.y_test,
                          DressConfig(sparsities=sparsities, pretrain_epochs=3, epochs=3,
                                      norm_epochs=0, batch_size=64))
    finally:
        torch.set_num_threads(threads)
    model = build_model(arch)
    model.load_state_dict({**model.state_dict(), **res.state})
    store_dress_state(model, res.allocation, res.norm_states)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tables = tables_from_state(state, arch)
    energies = [subnet_flops(tables, k)["flops"] * DEFAULT_PJ_PER_FLOP * 1e-9
                for k in range(len(sparsities))]
    return {"arch": arch, "state": state, "hash": model_hash(arch, state), "energies": energies,
            "ds": digits}
