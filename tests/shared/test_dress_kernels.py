"""Kernel choice by measurement, compact DRESS-CSR v2 files, the latency-aware allocation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from shared.dress import (
    DressError,
    DressRunner,
    allocate_sparsity,
    build_dress_tables,
    storage_bytes,
    subnet_state_dict,
    tables_from_bytes,
    tables_to_bytes,
)
from shared.dress.compact import decode, encode
from shared.dress.costs import layer_costs
from shared.dress.kernels import KernelPlan, choose_kernels
from shared.dress.serialize import META_KEY
from shared.dress.tables import template_model
from shared.models import ArchSpec, build_model

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
CNN = ArchSpec("cnn", (1, 12, 12), 10, hidden=(32,), channels=(4, 8))
MLP = ArchSpec("mlp", (1, 12, 12), 10, hidden=(48, 40))


def _tables(spec: ArchSpec, seed: int = 0, **kw):
    torch.manual_seed(seed)
    state = build_model(spec).state_dict()
    for key, t in state.items():
        if key.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            t.normal_(0, 0.1)
    return state, build_dress_tables(state, spec, SPARSITIES, **kw)


@pytest.mark.parametrize("spec", [CNN, MLP], ids=["cnn", "mlp"])
def test_kernel_choice_follows_the_measurements_and_keeps_outputs(spec):
    _, tables = _tables(spec)
    runner = DressRunner(tables)
    n_layers = len(runner.layer_names)
    calls = []

    def fake(r, k, batch, layer, kernel):  # sparse wins on even layers of odd subnets at b=1
        calls.append((k, batch, layer, kernel))
        if layer == -1:  # whole subnet: the dense module wins for subnet 2 at batch 32
            return 1.0 if (kernel == "dense") == (k == 2 and batch == 32) else 2.0
        if kernel == "dense":
            return 1.0
        return 0.5 if (batch == 1 and k % 2 == 1 and layer % 2 == 0) else 2.0

    plan = choose_kernels(runner, (1, 32), measure=fake, rounds=1)
    for k in range(4):
        want_b1 = tuple(not (k % 2 == 1 and li % 2 == 0) for li in range(n_layers))
        assert plan.dense[k] == (want_b1, (True,) * n_layers)
    assert plan.codes(1)[0].startswith("1:s") and plan.codes(0) == (
        "1:" + "d" * n_layers, "32:" + "d" * n_layers)
    assert plan.module == ((False, False), (False, False), (False, True), (False, False))
    assert plan.codes(2)[1].startswith("32:M")
    # Dense is timed once per layer and batch; sparse once per subnet; then each whole subnet.
    layer_calls = [c for c in calls if c[2] >= 0]
    assert sum(c[3] == "dense" for c in layer_calls) == 2 * n_layers
    assert sum(c[3] == "sparse" for c in layer_calls) == 2 * n_layers * 4
    assert len(calls) - len(layer_calls) == 2 * 2 * 4
    # Deterministic given the recorded timings, and the runner carries that plan.
    assert KernelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert runner.kernels == plan
    x = torch.rand(40, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    for k in range(4):
        runner.set_subnet(k)
        ref = build_model(spec)
        ref.load_state_dict(subnet_state_dict(tables, k))
        ref.eval()
        for batch in (1, 3, 32, 40):  # 3 -> the b=1 plan, 32 and 40 (chunked) -> b=32
            want = ref(x[:batch])
            got = runner(x[:batch])
            assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    assert plan.bucket(1) == 0 and plan.bucket(5) == 0 and plan.bucket(6) == 1
    with pytest.raises(DressError, match="kernel plan"):
        runner.set_kernels(KernelPlan.uniform(("x",), 4, True))


def test_real_measurement_gives_a_complete_plan():
    _, tables = _tables(MLP)
    runner = DressRunner(tables, subnet=2)
    plan = choose_kernels(runner, (1, 4), rounds=1)
    assert runner.subnet == 2 and len(plan.timings) == 4
    assert all(t > 0 for per_k in plan.timings for per_b in per_k for pair in per_b for t in pair)


@pytest.mark.parametrize("spec", [CNN, MLP], ids=["cnn", "mlp"])
def test_compact_csr_round_trips_and_is_smaller(spec):
    _, tables = _tables(spec)
    v1, v2 = tables_to_bytes(tables, version=1), tables_to_bytes(tables)
    assert len(v2) < len(v1) and storage_bytes(tables) == len(v2)
    for data in (v1, v2):
        back = tables_from_bytes(data)
        assert back.meta() == tables.meta()
        for key, t in tables.tensors.items():
            assert back.tensors[key].dtype == t.dtype and torch.equal(back.tensors[key], t)
    assert tables_to_bytes(tables_from_bytes(v2)) == v2


def test_column_codes_round_trip_both_encodings():
    gen = torch.Generator().manual_seed(0)
    for row_size, n in [(784, 392), (2000, 12), (600, 1), (9, 9)]:
        cols = torch.stack([torch.randperm(row_size, generator=gen)[:n].sort().values
                            for _ in range(5)])
        if row_size == 2000:
            cols[0, -1] = 1999  # a gap > 255 needs escapes
        enc, data = encode(cols, row_size)
        assert enc == ("gap8" if n * 8 < row_size else "bitmap")
        assert torch.equal(decode(enc, data, 5, row_size, n), cols)


def _v2_parts(data: bytes):
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][META_KEY])
    return dict(load(data)), meta


def _repack(tensors, meta) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def test_compact_csr_refuses_corrupt_input():
    _, tables = _tables(CNN, allocation_mode="uniform")
    data = tables_to_bytes(tables)
    tensors, meta = _v2_parts(data)
    name = tables.layers[1].name
    assert meta["layers"][1]["cols"] == "bitmap"
    cases = []
    bad = dict(tensors)
    flip = bad[f"{name}.cols"].clone()
    flip[0] ^= 1  # one column more or fewer in row 0
    bad[f"{name}.cols"] = flip
    cases.append((bad, meta, "exactly"))
    bad = dict(tensors)
    bad[f"{name}.cols"] = tensors[f"{name}.cols"][:-1].clone()
    cases.append((bad, meta, "bytes"))
    m2 = json.loads(json.dumps(meta))
    m2["layers"][1]["cols"] = "rle"
    cases.append((tensors, m2, "unknown column encoding"))
    m3 = json.loads(json.dumps(meta))
    m3["layers"][1]["cols"] = "gap8"
    cases.append((tensors, m3, "gap"))
    bad = dict(tensors)
    del bad[f"{name}.cols"]
    cases.append((bad, meta, "lacks"))
    bad = dict(tensors)
    v = bad[f"{name}.value"].clone()
    v[0, 0] = float("nan")
    bad[f"{name}.value"] = v
    cases.append((bad, meta, "finite"))
    for t, m, match in cases:
        with pytest.raises(DressError, match=match):
            tables_from_bytes(_repack(t, m))
    # gap8 streams: a trailing escape and a column past the row end are refused
    cols = torch.tensor([[3, 300]])
    enc, stream = encode(cols, 400)
    assert enc == "gap8"
    with pytest.raises(DressError):
        decode("gap8", torch.cat([stream, torch.tensor([255], dtype=torch.uint8)]), 1, 400, 2)
    with pytest.raises(DressError, match="outside"):
        decode("gap8", stream, 1, 299, 2)
    # a padding bit beyond the row size
    enc, bits = encode(torch.tensor([[0, 1, 2, 3, 4]]), 9)
    bits = bits.clone()
    bits[1] |= 0x80
    with pytest.raises(DressError, match="padding"):
        decode(enc, bits, 1, 9, 5)


def test_latency_allocation_meets_sparsities_and_thins_expensive_layers():
    state, _ = _tables(CNN)
    template = template_model(CNN)
    costs = layer_costs(template, CNN.input_shape)
    assert costs["features.0"] == 144 and costs["features.7"] == 36 and costs["classifier.1"] == 1
    weights = {k[: -len(".weight")]: v for k, v in state.items()
               if k.endswith(".weight") and v.dim() > 1}
    glob = allocate_sparsity(weights, SPARSITIES, "global")
    lat = allocate_sparsity(weights, SPARSITIES, "latency", costs=costs)
    tol = lat.tolerance()
    for k, s in enumerate(SPARSITIES):
        assert abs(lat.realised_sparsity(k) - s) <= tol + 1e-12
    macs = [sum(g * n * costs[name] for g, n, name in zip(a.rows, a.counts[-1], a.layers,
                                                          strict=True)) for a in (glob, lat)]
    assert macs[1] < macs[0]
    # the costliest conv keeps a smaller share of its weights than under global magnitude
    li = lat.layers.index("features.3")
    assert lat.counts[-1][li] < glob.counts[-1][li]
    tables = build_dress_tables(state, CNN, SPARSITIES, allocation_mode="latency")
    assert tables.allocation == lat
    with pytest.raises(DressError, match="cost"):
        allocate_sparsity(weights, SPARSITIES, "latency")
    with pytest.raises(DressError, match="only apply"):
        allocate_sparsity(weights, SPARSITIES, "global", costs=costs)
    dataclasses.replace(lat)  # frozen dataclass still a value
