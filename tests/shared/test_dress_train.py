"""The DRESS objective (Eq. 3.4-3.5) and a short end-to-end run of Alg. 3.1 on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.dress import (
    DressConfig,
    DressError,
    DressLoss,
    DressRunner,
    SubnetMasks,
    allocate_sparsity,
    build_dress_tables,
    csr_storage_bytes,
    dress_loss,
    global_magnitude_masks,
    loss_weights,
    prune_with_rewinding,
    row_masks,
)
from shared.dress.loss import backbone_weights
from shared.dress.train import train_dress
from shared.models import ArchSpec, build_model, init_weights_from_seed

SPARSITIES = (0.5, 0.8, 0.9)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    return init_weights_from_seed(build_model(spec), seed)


def test_gradient_is_eq_3_5():
    spec = ArchSpec("mlp", (1, 6, 6), 4, hidden=(16,))
    model = _model(spec)
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 4
    weights = {k: w.detach() for k, w in backbone_weights(model).items()}
    alloc = allocate_sparsity(weights, SPARSITIES)
    loss = dress_loss(model, x, y, allocation=alloc, gamma=0.5)
    loss.backward()
    # Reference: each subnet as its own model with masked weights, gradients masked and summed.
    pis = loss_weights(SPARSITIES, 0.5)
    expected = {name: torch.zeros_like(w) for name, w in weights.items()}
    want_loss = 0.0
    for k, pi in enumerate(pis):
        ref = _model(spec)
        masks = {n: row_masks(w, alloc.layer_counts(n))[k] for n, w in weights.items()}
        with torch.no_grad():
            for name, module in ref.named_modules():
                if name in masks:
                    module.weight.mul_(masks[name])
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        want_loss += pi * float(ref_loss.detach())
        for name, module in ref.named_modules():
            if name in masks:
                expected[name] += pi * module.weight.grad * masks[name]
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-6)
    for name, module in model.named_modules():
        if name in expected:
            torch.testing.assert_close(module.weight.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_loss_fn_interface_recomputes_allocation_from_weights():
    spec = ArchSpec("mlp", (1, 6, 6), 4, hidden=(16,))
    model = _model(spec)
    x, y = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 3, 0])
    loss_fn = DressLoss(SPARSITIES)
    weights = {k: w.detach() for k, w in backbone_weights(model).items()}
    fixed = dress_loss(model, x, y, allocation=allocate_sparsity(weights, SPARSITIES))
    assert float(loss_fn(model, x, y).detach()) == pytest.approx(float(fixed.detach()), rel=1e-6)
    uint8 = (x * 255).round().to(torch.uint8)
    assert torch.isfinite(loss_fn(model, uint8, y))  # raw images are scaled like elsewhere
    with pytest.raises(DressError):
        DressLoss()
    with pytest.raises(DressError, match="differ"):
        dress_loss(model, x, y, (0.1, 0.2), allocation=allocate_sparsity(weights, SPARSITIES))
    with SubnetMasks(model, allocate_sparsity(weights, SPARSITIES)):
        with pytest.raises(DressError, match="SubnetMasks"):
            loss_fn(model, x, y)


class _Frozen(torch.nn.Module):
    """A foreign parametrization (like a DPU update mask) that zeroes the first row."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(w[:1]), w[1:]])


def test_composes_with_foreign_parametrizations():
    spec = ArchSpec("mlp", (1, 6, 6), 4, hidden=(16,))
    model, plain = _model(spec), _model(spec)
    torch.nn.utils.parametrize.register_parametrization(model.net[1], "weight", _Frozen())
    with torch.no_grad():
        plain.net[1].weight[0] = 0
    x, y = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 3, 0])
    weights = {k: w.detach() for k, w in backbone_weights(plain).items()}
    alloc = allocate_sparsity(weights, SPARSITIES)
    ours = dress_loss(model, x, y, allocation=alloc)
    ours.backward()
    want = dress_loss(plain, x, y, allocation=alloc).detach()
    assert float(ours.detach()) == pytest.approx(float(want), rel=1e-6)
    grad = model.net[1].parametrizations.weight.original.grad
    assert grad is not None and torch.all(grad[0] == 0) and grad[1:].abs().sum() > 0


def _run(spec: ArchSpec, digits, config: DressConfig):
    model = _model(spec, 1)
    result = train_dress(
        model, digits.x_train, digits.y_train, digits.x_test, digits.y_test, config
    )
    tables = build_dress_tables(result.state, spec, config.sparsities, allocation=result.allocation,
                                norm_states=result.norm_states)  # fmt: skip
    runner = DressRunner(tables)
    x = torch.as_tensor(digits.x_test, dtype=torch.float32) / 255.0
    test_acc = []
    for k in range(tables.num_subnets):
        runner.set_subnet(k)
        test_acc.append(float((runner(x).argmax(1).numpy() == digits.y_test).mean()))
    return result, test_acc


def test_short_dress_run_on_digits_mlp(digits):
    spec = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64,))
    config = DressConfig(sparsities=SPARSITIES, pretrain_epochs=4, epochs=4, batch_size=32, lr=0.05)
    result, test_acc = _run(spec, digits, config)
    assert result.norm_states is None  # the MLP has no norm layers
    assert np.allclose(
        test_acc, result.val_accuracy
    )  # runner == masked model (test set = val here)
    assert min(test_acc) > 0.6, test_acc  # chance is 0.1
    assert [h["stage"] for h in result.history] == ["pretrain"] + ["dress"] * 4 + ["norms"]


def test_short_dress_run_on_digits_cnn_with_norms(digits):
    spec = ArchSpec("cnn", (1, 8, 8), 10, hidden=(32,), channels=(8, 16))
    config = DressConfig(
        sparsities=SPARSITIES, pretrain_epochs=3, epochs=3, norm_epochs=1, batch_size=32
    )
    result, test_acc = _run(spec, digits, config)
    assert result.norm_states is not None and len(result.norm_states) == len(SPARSITIES)
    assert min(test_acc) > 0.6, test_acc


def test_pruning_baseline_reaches_exact_sparsity(digits):
    spec = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64,))
    config = DressConfig(sparsities=SPARSITIES, batch_size=32, lr=0.05)
    model = _model(spec, 2)
    state, val_acc = prune_with_rewinding(model, digits.x_train, digits.y_train, digits.x_test,
                                          digits.y_test, 0.9, config)  # fmt: skip
    weights = [state[f"{n}.weight"] for n in ("net.1", "net.3")]
    kept = sum(int((w != 0).sum()) for w in weights)
    assert kept == round(0.1 * sum(w.numel() for w in weights))
    assert val_acc > 0.5  # chance is 0.1
    # Sparse storage shrinks with the nonzeros: a denser copy of the same model costs more.
    denser = dict(state, **{"net.1.weight": state["net.1.weight"] + 1e-3})
    assert csr_storage_bytes(state, spec) < csr_storage_bytes(denser, spec)


def test_global_magnitude_masks_keep_the_largest():
    gen = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(4, 5, generator=gen), "b": torch.randn(3, 7, generator=gen) * 3}
    masks = global_magnitude_masks(weights, 0.75)
    kept = torch.cat([w[masks[n]].abs() for n, w in weights.items()])
    dropped = torch.cat([w[~masks[n]].abs() for n, w in weights.items()])
    assert len(kept) == round(0.25 * 41) and kept.min() >= dropped.max()
