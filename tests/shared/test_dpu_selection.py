"""DPU selection maths: Eq. 5.6/5.9/5.10 by hand, global top-k, budget, re-init rule, feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from shared.dpu import (
    DPUConfig,
    DPUConfigError,
    add_residual,
    binary_entropy,
    combined_contribution,
    dense_bytes,
    global_contribution,
    global_topk_mask,
    k_for_byte_budget,
    lr_at,
    paper_update_bits,
    partial_parameter_names,
    should_reinitialize,
    train_phase,
)
from shared.models import ArchSpec, build_model

W0 = [[1.0, -2.0], [0.5, 3.0]]
B = [[1.0, 2.0], [4.0, 0.5]]  # per-weight curvature of the quadratic loss below


def _quadratic_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # l(W) = 0.5 * sum(B * W^2): g(W) = B * W, independent of the data (x, y are ignored).
    return 0.5 * (torch.tensor(B) * model.weight.square()).sum()


def _run_2x2(optimizer: str, steps: int, lr: float) -> tuple[nn.Linear, dict, dict]:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0))
    start = {"weight": model.weight.detach().clone()}
    config = DPUConfig(steps=steps, optimizer=optimizer, momentum=0.0, lr=lr, batch_size=1)
    out = train_phase(
        model,
        torch.zeros(1, 2),
        torch.zeros(1, dtype=torch.long),
        config,
        loss_fn=_quadratic_loss,
        partial={"weight": model.weight},
        track_local=True,
    )
    return model, start, out.c_local


def test_contributions_match_eq_5_6_5_9_5_10_by_hand_with_sgd():
    lr = 0.1
    model, start, c_local = _run_2x2("sgd", steps=2, lr=lr)
    exp_local, exp_global = [[0.0] * 2 for _ in range(2)], [[0.0] * 2 for _ in range(2)]
    for i in range(2):
        for j in range(2):
            b, w0 = B[i][j], W0[i][j]
            g0 = b * w0  # g(w^0)
            w1 = w0 - lr * g0
            g1 = b * w1  # g(w^1)
            w2 = w1 - lr * g1
            exp_local[i][j] = -(g0 * (w1 - w0) + g1 * (w2 - w1))  # Eq. 5.9
            exp_global[i][j] = (w2 - w0) ** 2  # Eq. 5.6
    torch.testing.assert_close(c_local["weight"], torch.tensor(exp_local), rtol=1e-5, atol=1e-7)
    c_global = global_contribution(start, {"weight": model.weight.detach()})
    torch.testing.assert_close(c_global["weight"], torch.tensor(exp_global), rtol=1e-5, atol=1e-7)

    combined = combined_contribution(c_local, c_global)["weight"]  # Eq. 5.10
    sum_l = sum(map(sum, exp_local))
    sum_g = sum(map(sum, exp_global))
    expected = [
        [exp_global[i][j] / sum_g + exp_local[i][j] / sum_l for j in range(2)] for i in range(2)
    ]
    torch.testing.assert_close(combined, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    mask = global_topk_mask({"weight": combined}, 0.5)["weight"]
    top2 = sorted(((expected[i][j], (i, j)) for i in range(2) for j in range(2)), reverse=True)[:2]
    assert {ij for _, ij in top2} == {tuple(ix) for ix in mask.nonzero().tolist()}


def test_local_contribution_uses_the_actual_adam_step_not_lr_times_gradient():
    # Adam's first step is -lr * g / (|g| + eps), so Eq. 5.9 gives lr * |g| (not lr * g^2).
    lr = 0.01
    _, _, c_local = _run_2x2("adam", steps=1, lr=lr)
    g = torch.tensor(B) * torch.tensor(W0)
    torch.testing.assert_close(c_local["weight"], lr * g.abs(), rtol=1e-4, atol=1e-8)


def test_combined_contribution_normalises_over_the_whole_model_not_per_tensor():
    c_local = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    c_global = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([4.0])}
    c = combined_contribution(c_local, c_global)
    torch.testing.assert_close(c["a"], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(c["b"], torch.tensor([1.0]))


def test_negative_local_sum_does_not_invert_the_ranking():
    c = combined_contribution({"a": torch.tensor([-3.0, 1.0])}, {"a": torch.zeros(2)})
    assert c["a"][1] > c["a"][0]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    k=st.floats(0.0, 1.0),
    levels=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_global_topk_has_exactly_round_k_i_ones_and_breaks_ties_by_position(sizes, k, levels, seed):
    rng = np.random.default_rng(seed)
    # Few distinct levels -> many ties across and within tensors.
    scores = {
        f"t{i}": torch.from_numpy(rng.integers(0, levels, n).astype(np.float32))
        for i, n in enumerate(sizes)
    }
    masks = global_topk_mask(scores, k)
    flat_scores = np.concatenate([scores[n].numpy() for n in scores])
    flat_mask = np.concatenate([masks[n].numpy() for n in scores])
    total = len(flat_scores)
    assert flat_mask.sum() == min(total, math.floor(k * total + 0.5))
    reference = np.argsort(-flat_scores, kind="stable")[: flat_mask.sum()]
    assert set(np.flatnonzero(flat_mask)) == set(reference.tolist())
    assert all(masks[n].dtype == torch.bool and masks[n].shape == scores[n].shape for n in scores)


def test_global_topk_is_one_ranking_across_layers_and_rejects_nan():
    masks = global_topk_mask(
        {"small": torch.tensor([0.1, 0.2]), "big": torch.tensor([5.0, 6.0, 7.0])}, 0.6
    )
    assert masks["small"].sum() == 0 and masks["big"].all()
    with pytest.raises(DPUConfigError, match="bad"):
        global_topk_mask({"bad": torch.tensor([float("nan"), 1.0])}, 0.5)


def test_partial_names_are_weight_matrices_not_biases_or_norm_layers():
    cnn = build_model(ArchSpec("cnn", (1, 8, 8), 10, hidden=(16,), channels=(4,)))
    names = partial_parameter_names(cnn)
    params = dict(cnn.named_parameters())
    assert names and all(params[n].dim() > 1 for n in names)
    norm = [n for n, m in cnn.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert not any(n.rpartition(".")[0] in norm for n in names)
    only_last = partial_parameter_names(cnn, lambda n, p: n == "classifier.4.weight")
    assert only_last == ("classifier.4.weight",)


def test_should_reinitialize_when_data_more_than_doubles():
    assert not should_reinitialize(100, 50)
    assert should_reinitialize(101, 50)
    assert should_reinitialize(1, 0)
    with pytest.raises(DPUConfigError, match="n_now=-1"):
        should_reinitialize(-1, 5)


def test_byte_budget_default_accounting_picks_the_largest_fitting_k():
    model = build_model(ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,)))
    state = model.state_dict()
    names = partial_parameter_names(model)
    total = sum(state[n].numel() for n in names)
    dense = dense_bytes(state, names)
    assert dense == (32 + 10) * 4

    def size(k: float, bits: int = 8) -> int:
        return math.ceil(paper_update_bits(k, total, bits) / 8) + dense

    for budget in (dense, dense + 50, dense + 300, dense + 1000):
        k = k_for_byte_budget(budget, state, names, value_bits=8)
        n = round(k * total)
        assert size(n / total) <= budget < size((n + 1) / total)
    assert k_for_byte_budget(10**9, state, names) == 1.0
    with pytest.raises(DPUConfigError, match="budget of 10 bytes"):
        k_for_byte_budget(10, state, names)


def test_byte_budget_with_caller_size_function():
    state = {"w": torch.zeros(1000), "b": torch.zeros(3)}

    def size(k: float) -> int:  # a codec-like cost: header + 6 bytes per selected weight
        return 40 + 6 * round(k * 1000)

    k = k_for_byte_budget(40 + 6 * 123 + 5, state, ["w"], size_fn=size)
    assert round(k * 1000) == 123


def test_binary_entropy_and_paper_bits():
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0.0) == 0.0
    assert paper_update_bits(0.01, 1000, 32) == pytest.approx(320 + 1000 * binary_entropy(0.01))


def test_lr_schedule_decays_at_milestones():
    c = DPUConfig(lr=1.0, lr_milestones=(1 / 3, 2 / 3), lr_gamma=0.1)
    assert [lr_at(c, q, 6) for q in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_config_validation_names_the_bad_values():
    with pytest.raises(DPUConfigError, match=r"k=1.5"):
        DPUConfig(k=1.5)
    with pytest.raises(DPUConfigError, match="method='prune'"):
        DPUConfig(method="prune")


def test_add_residual_only_where_shipped():
    target = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    residual = {"w": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([0.05])}
    intended, leftover = add_residual(target, residual, {"w": torch.tensor([True, False, True])})
    torch.testing.assert_close(intended["w"], torch.tensor([1.1, 2.0, 3.3]))
    torch.testing.assert_close(leftover["w"], torch.tensor([0.0, 0.2, 0.0]))
    torch.testing.assert_close(intended["b"], torch.tensor([0.55]))
    torch.testing.assert_close(leftover["b"], torch.tensor([0.0]))
