"""Sparse kernels against the dense masked model; switching without copies; profiling helpers."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from shared.dress import (
    DressError,
    DressRunner,
    SubnetMasks,
    build_dress_tables,
    measure_latency,
    measure_switch,
    peak_memory_estimate,
    row_masks,
    subnet_flops,
    subnet_state_dict,
    subnet_storage,
)
from shared.models import ArchSpec, build_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Logits of the sparse kernels and of the dense masked model differ only by float32 summation
# order: we require max |diff| <= RTOL * (1 + max |logit|).
RTOL = 1e-5


def _state(spec: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(spec)
    state = model.state_dict()
    for key, t in state.items():
        if key.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            t.normal_(0, 0.2)
        elif key.endswith("bias") and t.is_floating_point():
            t.normal_(0, 0.1)
    return {k: v.clone() for k, v in state.items()}


def _norms(state: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]] | None:
    prefixes = {key[: -len("running_var")] for key in state if key.endswith("running_var")}
    if not prefixes:
        return None
    gen = torch.Generator().manual_seed(k)
    out = []
    for _ in range(k):
        out.append(
            {
                p + leaf: state[p + leaf]
                * (0.8 + 0.4 * torch.rand(state[p + leaf].shape, generator=gen))
                for p in prefixes
                for leaf in ("weight", "bias", "running_mean", "running_var")
            }
        )
    return out


SPECS = {
    "mlp": ArchSpec("mlp", (1, 10, 10), 7, hidden=(48, 32)),
    "cnn": ArchSpec("cnn", (1, 12, 12), 10, hidden=(24,), channels=(6, 12)),
    "cnn-odd": ArchSpec("cnn", (3, 13, 11), 5, hidden=(), channels=(4,)),  # odd sizes, 3 channels
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def case(request):
    spec = SPECS[request.param]
    state = _state(spec, 0)
    tables = build_dress_tables(state, spec, SPARSITIES, norm_states=_norms(state, len(SPARSITIES)))
    return spec, tables


PATHS = {"sparse": {"conv": 2.0, "fc": 2.0}, "dense": {"conv": -1.0, "fc": -1.0}, "default": None}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_kernels_equal_dense_masked_model(case, batch, path):
    spec, tables = case
    runner = DressRunner(tables, dense_above=PATHS[path])
    x = torch.rand(batch, *spec.input_shape, generator=torch.Generator().manual_seed(batch))
    for k in range(tables.num_subnets):
        dense = build_model(spec).eval()
        dense.load_state_dict(subnet_state_dict(tables, k))
        runner.set_subnet(k)
        with torch.no_grad():
            want = dense(x)
        got = runner(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= RTOL * (1 + want.abs().max()), f"subnet {k}"


def test_large_batches_run_in_chunks(case):
    spec, tables = case
    runner = DressRunner(tables, subnet=2, max_batch=2)
    x = torch.rand(5, *spec.input_shape, generator=torch.Generator().manual_seed(5))
    dense = build_model(spec).eval()
    dense.load_state_dict(subnet_state_dict(tables, 2))
    with torch.no_grad():
        want = dense(x)
    assert (runner(x) - want).abs().max() <= RTOL * (1 + want.abs().max())
    assert set(runner._scratches) <= {1, 2}


def test_switch_copies_no_weights(case):
    _, tables = case
    runner = DressRunner(tables)
    ptrs = {key: t.data_ptr() for key, t in tables.tensors.items()}
    storages = {t.untyped_storage().data_ptr() for t in tables.tensors.values()}
    for k in [3, 0, 2, 1, 3]:
        runner.set_subnet(k)
        runner(torch.zeros(1, *tables.spec.input_shape))
        assert {key: t.data_ptr() for key, t in tables.tensors.items()} == ptrs
        for op in runner._ops:  # the active subnet is views into the tables, nothing else
            for t in (op.index, op.value, op.scale, op.shift):
                assert t is None or t.untyped_storage().data_ptr() in storages
    assert not list(runner.parameters()) and not list(runner.buffers())  # tables are referenced


def test_subnet_masks_switch_in_place_and_match_tables():
    spec = SPECS["cnn"]
    state = _state(spec, 1)
    norms = _norms(state, len(SPARSITIES))
    tables = build_dress_tables(state, spec, SPARSITIES, norm_states=norms)
    model = build_model(spec).eval()
    model.load_state_dict(state)
    x = torch.rand(2, *spec.input_shape)
    with SubnetMasks(model, tables.allocation, norms) as masks:
        ptrs = [m.mask.data_ptr() for m in masks._masks]
        for k in range(len(SPARSITIES)):
            masks.set_subnet(k)
            ref = build_model(spec).eval()
            ref.load_state_dict(subnet_state_dict(tables, k))
            with torch.no_grad():
                assert torch.allclose(model(x), ref(x), atol=1e-6)
            assert [m.mask.data_ptr() for m in masks._masks] == ptrs
    dense_again = model.state_dict()["features.0.weight"]
    assert torch.equal(dense_again, state["features.0.weight"])


def test_subnet_masks_follow_weight_changes_on_refresh():
    spec = SPECS["mlp"]
    model = build_model(spec)
    tables = build_dress_tables(model.state_dict(), spec, SPARSITIES)
    with SubnetMasks(model, tables.allocation) as masks:
        masks.set_subnet(2)
        with torch.no_grad():
            model.net[1].parametrizations.weight.original.mul_(-2).add_(0.01)  # new ranks
        masks.refresh()
        w = model.net[1].parametrizations.weight.original
        want = row_masks(w, tables.allocation.layer_counts("net.1"))[2]
        assert torch.equal(masks._masks[0].mask, want)
        assert torch.equal(model.net[1].weight, w * want)
        with pytest.raises(DressError, match="already parametrized"):
            SubnetMasks(model, tables.allocation)


def test_bad_inputs_are_rejected(case):
    spec, tables = case
    runner = DressRunner(tables)
    with pytest.raises(DressError, match="input must be"):
        runner(torch.zeros(1, 2, 2))
    with pytest.raises(DressError, match="out of range"):
        runner.set_subnet(len(SPARSITIES))


def test_flops_storage_and_memory_shrink_with_sparsity(case):
    spec, tables = case
    dense = subnet_flops(tables, None)["macs"]
    macs = [subnet_flops(tables, k)["macs"] for k in range(tables.num_subnets)]
    assert all(a > b for a, b in pairwise(macs)) and macs[0] < dense
    model = build_model(spec)
    if spec.kind == "mlp":  # dense MACs of an MLP are the weight count
        assert dense == sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    storage = subnet_storage(tables)
    assert storage["per_subnet"] == sorted(storage["per_subnet"], reverse=True)
    assert storage["per_subnet"][0] <= storage["total"]
    runner = DressRunner(tables)
    assert peak_memory_estimate(runner) > runner.memory_bytes()["tables"] > 0


def test_latency_helpers_report_sane_numbers():
    spec = SPECS["mlp"]
    tables = build_dress_tables(_state(spec, 2), spec, SPARSITIES)
    runner = DressRunner(tables)
    lat = measure_latency(runner, 3, spec.input_shape, reps=20, warmup=2)
    assert 0 < lat.p50_ms <= lat.p95_ms and lat.reps == 20 and lat.threads >= 1
    assert runner.subnet == 3
    assert measure_switch(runner, reps=8) > 0
    with pytest.raises(DressError):
        measure_latency(runner, None, spec.input_shape)
