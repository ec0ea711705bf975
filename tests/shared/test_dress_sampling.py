"""Row-based sampling (Alg. 3.2), nesting (Eq. 3.3), loss weights (Eq. 3.6-3.7), allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.dress import (
    Allocation,
    DressError,
    allocate_sparsity,
    check_allocation,
    check_masks,
    loss_weights,
    row_masks,
    row_order,
)
from shared.dress.sampling import check_sparsities


@st.composite
def weight_and_counts(draw):
    g = draw(st.integers(1, 6))
    n = draw(st.integers(1, 12))
    # Few distinct magnitudes (with both signs) so ties are common.
    levels = draw(st.integers(1, 5))
    values = draw(st.lists(st.integers(-levels, levels), min_size=g * n, max_size=g * n))
    w = torch.tensor(values, dtype=torch.float32).view(g, n) / 4
    k = draw(st.integers(1, 4))
    counts = sorted(draw(st.lists(st.integers(0, n), min_size=k, max_size=k)), reverse=True)
    return w, counts


def reference_order(w: torch.Tensor) -> np.ndarray:
    """|w| descending, ties by index ascending, via numpy's lexsort (an independent sort)."""
    a = np.abs(w.numpy())
    idx = np.arange(a.shape[1])
    return np.stack([np.lexsort((idx, -row)) for row in a])


@settings(max_examples=200, deadline=None)
@given(weight_and_counts())
def test_masks_nested_with_equal_row_counts(case):
    w, counts = case
    masks = row_masks(w, counts)
    check_masks(masks, counts)  # raises on any violation
    order = reference_order(w)
    for k, c in enumerate(counts):
        assert masks[k].sum(dim=1).tolist() == [c] * w.shape[0]
        for g in range(w.shape[0]):
            assert set(np.flatnonzero(masks[k, g].numpy())) == set(order[g, :c])
    for k in range(1, len(counts)):
        assert torch.equal(masks[k - 1] & masks[k], masks[k])  # Eq. 3.3


@settings(max_examples=100, deadline=None)
@given(weight_and_counts())
def test_row_order_matches_reference_with_ties(case):
    w, _ = case
    assert np.array_equal(row_order(w).numpy(), reference_order(w))


def test_row_masks_on_conv_weight_keeps_shape_and_rows():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    masks = row_masks(w, [27, 9, 2])
    assert masks.shape == (3, 4, 3, 3, 3)
    assert masks[1].reshape(4, -1).sum(1).tolist() == [9] * 4
    kept = (w.reshape(4, -1).abs() * masks[2].reshape(4, -1)).amax(1)
    assert torch.equal(kept, w.reshape(4, -1).abs().amax(1))  # the largest weight always stays


def test_check_masks_rejects_violations():
    masks = torch.zeros(2, 2, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 3] = True  # keeps a weight subnet 0 dropped
    with pytest.raises(DressError, match="not nested"):
        check_masks(masks, [2, 1])
    masks[1] = False
    masks[1, 0, 0] = True  # row 1 has no nonzero
    with pytest.raises(DressError, match="row 1 has 0 nonzeros"):
        check_masks(masks, [2, 1])


def test_loss_weights_match_thesis_example():
    # §3.4.2.4: ResNet20 with s = 0.8..0.99.
    s = [0.8, 0.9, 0.95, 0.98, 0.99]
    assert np.allclose(loss_weights(s, 0.5), [0.36, 0.26, 0.18, 0.12, 0.08], atol=0.006)
    assert np.allclose(loss_weights(s, -1.0), [0.03, 0.05, 0.11, 0.27, 0.54], atol=0.006)
    assert np.allclose(loss_weights(s, 0.0), [0.2] * 5)


@pytest.mark.parametrize("bad", [[], [0.5, 0.5], [0.9, 0.5], [1.0], [-0.1], [float("nan")]])
def test_bad_sparsities_rejected(bad):
    with pytest.raises(DressError):
        check_sparsities(bad)


@st.composite
def layers_and_sparsities(draw):
    n_layers = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 20)), draw(st.integers(4, 40))) for _ in range(n_layers)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    weights = {
        f"l{i}": torch.randn(g, n, generator=gen) * (i + 1) for i, (g, n) in enumerate(shapes)
    }
    total = sum(g * n for g, n in shapes)
    rows = sum(g for g, _ in shapes)
    k = draw(st.integers(1, 4))
    # Keep s_K feasible with >= 1 weight per row and levels far enough apart to be realisable.
    hi = 1.0 - 1.5 * rows / total
    if hi < 0.1:
        return weights, [0.0]
    levels = sorted(set(draw(st.lists(st.floats(0.0, hi), min_size=k, max_size=k))))
    spaced = [levels[0]]
    for v in levels[1:]:
        if v - spaced[-1] > max(g for g, _ in shapes) / total + 1e-3:
            spaced.append(v)
    return weights, spaced


@settings(max_examples=80, deadline=None)
@given(layers_and_sparsities())
def test_allocation_realises_sparsity_and_nests(case):
    weights, sparsities = case
    alloc = allocate_sparsity(weights, sparsities)
    check_allocation(alloc)
    for k, s in enumerate(sparsities):
        assert abs(alloc.realised_sparsity(k) - s) <= alloc.tolerance() + 1e-12
        nnz = 0
        for name, w in weights.items():
            masks = row_masks(w, alloc.layer_counts(name))
            check_masks(masks, alloc.layer_counts(name))
            nnz += int(masks[k].sum())
        assert nnz == alloc.nnz(k)


def test_allocation_follows_global_magnitude():
    gen = torch.Generator().manual_seed(0)
    weights = {
        "small": torch.randn(8, 50, generator=gen) * 0.01,
        "large": torch.randn(8, 50, generator=gen),
    }
    alloc = allocate_sparsity(weights, [0.5])
    small, large = alloc.counts[0]
    assert small == 1 and large == 49  # the small layer keeps only its 1-per-row floor
    assert Allocation.from_dict(alloc.to_dict()) == alloc


def test_infeasible_sparsity_is_reported():
    weights = {"a": torch.randn(10, 4)}
    with pytest.raises(DressError, match="cannot realise sparsity"):
        allocate_sparsity(weights, [0.9])  # needs 4 nonzeros, but 10 rows keep >= 1 each


def test_uniform_allocation_spreads_sparsity_evenly():
    gen = torch.Generator().manual_seed(1)
    weights = {
        "a": torch.randn(16, 90, generator=gen) * 0.01,
        "b": torch.randn(32, 120, generator=gen),
    }
    alloc = allocate_sparsity(weights, [0.5, 0.9], mode="uniform")
    check_allocation(alloc)
    assert alloc.counts == ((45, 60), (9, 12))  # magnitudes play no part
    with pytest.raises(DressError, match="allocation mode"):
        allocate_sparsity(weights, [0.5], mode="layerwise")
