"""DRESS-CSR tables: round trip, exact masked weights, determinism, storage bound, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.dress import (
    DressError,
    allocate_sparsity,
    build_dress_tables,
    row_masks,
    storage_bytes,
    subnet_state_dict,
    subnet_tables,
    tables_from_bytes,
    tables_to_bytes,
)
from shared.dress.tables import fold_norm, index_dtype
from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed

SPARSITIES = (0.5, 0.8, 0.9, 0.95)


def trained_like_state(spec: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights plus non-trivial norm statistics (as after training)."""
    model = init_weights_from_seed(build_model(spec), seed)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if key.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif key.endswith(("running_mean", "bias")) and t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return {k: v.clone() for k, v in state.items()}


def per_subnet_norms(state: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    keys = [
        key
        for key in state
        if key.rsplit(".", 1)[-1] in ("weight", "bias", "running_mean", "running_var")
        and any(key.startswith(p) for p in _norm_prefixes(state))
    ]
    return [{key: state[key] * (1 + 0.1 * i) for key in keys} for i in range(k)]


def _norm_prefixes(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.rsplit(".", 1)[0] + "." for key in state if key.endswith("running_var")}


@pytest.fixture(scope="module")
def cnn():
    spec = ArchSpec("cnn", (1, 12, 12), 10, hidden=(24,), channels=(6, 12))
    state = trained_like_state(spec, 3)
    norms = per_subnet_norms(state, len(SPARSITIES))
    return spec, state, norms, build_dress_tables(state, spec, SPARSITIES, norm_states=norms)


def test_tables_hold_exactly_the_masked_weights(cnn):
    spec, state, norms, tables = cnn
    alloc = tables.allocation
    for k in range(len(SPARSITIES)):
        sub = subnet_state_dict(tables, k)
        for name in alloc.layers:
            w = state[f"{name}.weight"]
            mask = row_masks(w, alloc.layer_counts(name))[k]
            assert torch.equal(sub[f"{name}.weight"], w * mask)
        for prefix in _norm_prefixes(state):
            bn = [
                norms[k][prefix + key] for key in ("weight", "bias", "running_mean", "running_var")
            ]
            scale, shift = fold_norm(*bn, 1e-5)
            assert torch.equal(sub[prefix + "weight"], scale) and torch.equal(
                sub[prefix + "bias"], shift
            )
        model = build_model(spec).eval()
        model.load_state_dict(sub)  # complete and loadable
        reference = build_model(spec).eval()
        reference.load_state_dict(
            {
                **{
                    k_: v * row_masks(v, alloc.layer_counts(k_[:-7]))[k]
                    if k_[:-7] in alloc.layers and k_.endswith(".weight")
                    else v
                    for k_, v in state.items()
                },
                **norms[k],
            }
        )
        x = torch.rand(2, *spec.input_shape)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_layout_is_rows_by_importance_with_smallest_index_dtype(cnn):
    _, state, _, tables = cnn
    for t in tables.layers:
        idx, val = tables.index(t.name), tables.value(t.name)
        assert idx.shape == (t.rows, t.counts[0]) and idx.dtype == index_dtype(t.row_size)
        w = state[f"{t.name}.weight"].reshape(t.rows, -1)
        assert torch.equal(w.gather(1, idx.long()), val)
        assert (val.abs()[:, 1:] <= val.abs()[:, :-1]).all()
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(1 << 15) == torch.int16 and index_dtype((1 << 15) + 1) == torch.int32


def test_round_trip_through_bytes(cnn):
    _, _, _, tables = cnn
    data = tables_to_bytes(tables)
    back = tables_from_bytes(data)
    assert back.meta() == tables.meta()
    assert back.tensors.keys() == tables.tensors.keys()
    for key, t in tables.tensors.items():
        assert back.tensors[key].dtype == t.dtype and torch.equal(back.tensors[key], t)
    assert tables_to_bytes(back) == data


def test_rebuild_is_bit_identical_and_tracks_new_weights(cnn):
    spec, state, norms, tables = cnn
    # The agent rebuilds from its own copy of the weights (different dict order and storage).
    agent_state = {k: state[k].clone() for k in reversed(list(state))}
    again = build_dress_tables(agent_state, spec, SPARSITIES, norm_states=[dict(n) for n in norms])
    assert tables_to_bytes(again) == tables_to_bytes(tables)
    # A "DPU diff": a few weights change; both sides rebuild and agree, and the tables move.
    patched = {k: v.clone() for k, v in state.items()}
    w = patched["features.3.weight"].view(-1)
    w[::7] += 0.05
    server = build_dress_tables(
        patched, spec, SPARSITIES, allocation=tables.allocation, norm_states=norms
    )
    agent = build_dress_tables(
        {k: v.clone() for k, v in patched.items()},
        spec,
        SPARSITIES,
        allocation=tables.allocation,
        norm_states=norms,
    )
    assert tables_to_bytes(server) == tables_to_bytes(agent)
    assert server.source_hash == agent.source_hash != tables.source_hash
    assert not torch.equal(server.value("features.3"), tables.value("features.3"))


def test_all_subnets_cost_at_most_5_percent_more_than_the_densest():
    spec = default_spec("cnn", (1, 28, 28), 10)
    state = trained_like_state(spec, 0)
    alloc = allocate_sparsity(
        {k[:-7]: v for k, v in state.items() if k.endswith(".weight") and v.dim() > 1}, SPARSITIES
    )
    tables = build_dress_tables(
        state, spec, SPARSITIES, allocation=alloc, norm_states=per_subnet_norms(state, 4)
    )
    densest = storage_bytes(subnet_tables(tables, 0))
    total = storage_bytes(tables)
    assert total <= 1.05 * densest
    values = sum(tables.value(t.name).numel() * 4 for t in tables.layers)
    # v2 files store each row's column set (bitmap or uint8 gaps), not importance-ordered ints.
    indices = sum(
        min(t.rows * ((t.row_size + 7) // 8), t.rows * t.counts[0]) for t in tables.layers
    )
    norms = sum(
        tables.tensors[f"{n.name}.{key}"].numel() * 4
        for n in tables.norms
        for key in ("scale", "shift")
    )
    assert total > values + indices + norms  # headers and biases are counted too


def test_sparsest_subnet_alone_is_a_valid_table(cnn):
    spec, _, _, tables = cnn
    last = subnet_tables(tables, 3)
    assert last.num_subnets == 1
    assert torch.equal(
        subnet_state_dict(last, 0)["features.0.weight"],
        subnet_state_dict(tables, 3)["features.0.weight"],
    )
    assert storage_bytes(last) < storage_bytes(tables)


def test_corrupt_tables_are_rejected(cnn):
    _, state, _, tables = cnn
    data = tables_to_bytes(tables)
    with pytest.raises(DressError):
        tables_from_bytes(data[: len(data) // 2])
    with pytest.raises(DressError):
        tables_from_bytes(b"\x00" * 64)
    bad = dict(tables.tensors)
    bad["features.0.value"] = bad["features.0.value"].flip(1)  # no longer in importance order
    with pytest.raises(DressError, match="importance order"):
        tables_from_bytes(tables_to_bytes(dataclasses.replace(tables, tensors=bad)))
    bad = dict(tables.tensors)
    idx = bad["features.3.index"].clone()
    idx[0, 0] = tables.layers[1].row_size  # out of range
    bad["features.3.index"] = idx
    with pytest.raises(DressError, match="outside"):
        tables_from_bytes(tables_to_bytes(dataclasses.replace(tables, tensors=bad)))


def test_state_must_match_spec(cnn):
    spec, state, _, _ = cnn
    broken = dict(state)
    del broken["features.0.weight"]
    with pytest.raises(DressError, match="missing"):
        build_dress_tables(broken, spec, SPARSITIES)
    with pytest.raises(DressError, match="norm states"):
        build_dress_tables(state, spec, SPARSITIES, norm_states=[{}])
