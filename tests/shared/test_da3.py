"""DA³ (shared/da3): the gate, the frozen backbone, the skip path, the memory count, the
baselines and the spec's validation, on a small resnet so the file stays fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.da3 import (
    METHODS,
    DA3Error,
    DA3Refused,
    DA3TrainConfig,
    SavedTensorsCounter,
    adaptor_tensor_names,
    analytic_training_memory,
    da3_block_bytes,
    da3_spec,
    evaluate_domain,
    head_loss_bytes,
    plan_training,
    resize_images,
    train_domain,
    trainable_names,
)
from shared.da3.ops import (
    GatedCorrection,
    GumbelGate,
    frozen_conv_bn,
    pack_bits,
    packed_relu,
    sparse_correction,
    unpack_bits,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.models.spec import parameter_count

BACKBONE = ArchSpec("resnet", (1, 12, 12), 3, hidden=(1, 2), channels=(4, 8))
ADAPTOR = {"finetune": "none", "last": "none", "bias": "none"}


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.random((n, 1, 12, 12)) * 80).astype(np.uint8)
    for k in range(3):
        x[y == k, 0, 4 * k : 4 * k + 4, :] += 150
    return x, y.astype(np.int64)


def _model(method: str, seed: int = 1, **options) -> torch.nn.Module:
    spec = da3_spec(BACKBONE, adaptor=ADAPTOR.get(method, method), **options)
    return init_weights_from_seed(build_model(spec), seed)


def test_resnet_kind_counts_builds_and_seeds_deterministically():
    model = init_weights_from_seed(build_model(BACKBONE), 5)
    assert sum(t.numel() for t in model.state_dict().values()) == parameter_count(BACKBONE)
    again = init_weights_from_seed(build_model(BACKBONE), 5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert model(torch.rand(2, 1, 12, 12)).shape == (2, 3)
    with pytest.raises(ValueError, match="as many block counts"):
        ArchSpec("resnet", (1, 12, 12), 3, hidden=(1,), channels=(4, 8))
    with pytest.raises(ValueError, match="shrink"):
        ArchSpec("resnet", (1, 2, 2), 3, hidden=(1, 1, 1), channels=(4, 4, 4))


def test_adapted_model_starts_as_the_backbone_and_owns_only_its_tensors():
    backbone = init_weights_from_seed(build_model(BACKBONE), 3)
    model = build_model(da3_spec(BACKBONE))
    init_weights_from_seed(model, 3)
    # The backbone's tensors keep their names and values: a backbone state loads into it.
    state = model.state_dict()
    for k, v in backbone.state_dict().items():
        assert torch.equal(state[k], v)
    assert state["da3.blocks.0.weight"].abs().sum() == 0  # zero correction at init
    assert torch.all(state["da3.blocks.0.gate.bias"] == 3.0)
    x = torch.rand(4, 1, 12, 12)
    backbone.eval(), model.eval()
    torch.testing.assert_close(model(x), backbone(x))
    names = adaptor_tensor_names(model.arch_spec)
    assert names == sorted(k for k in state if k.startswith("da3.")) + ["head.bias", "head.weight"]


def test_gate_forward_is_binary_and_backward_straight_through():
    torch.manual_seed(0)
    z = torch.randn(2, 1, 5, 5, requires_grad=True)
    noise = torch.randn(2, 1, 5, 5)
    beta, temp = 2.0, 0.5
    hard = GumbelGate.apply(z, noise, beta, temp)
    pi0 = torch.sigmoid(beta * z)  # Eq. (1)
    relaxed = torch.sigmoid((torch.log(pi0) - torch.log1p(-pi0) + noise) / temp)  # Eq. (2)-(3)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard, (relaxed > 0.5).float())
    w = torch.randn_like(hard)
    (gz,) = torch.autograd.grad((hard * w).sum(), z)
    (expected,) = torch.autograd.grad((relaxed * w).sum(), z)  # d hard / dz := d relaxed / dz
    torch.testing.assert_close(gz, expected, rtol=1e-2, atol=1e-6)  # the factor is kept as bfloat16
    assert not torch.equal(gz, torch.zeros_like(gz))


def test_training_sample_is_open_with_probability_pi0():
    from shared.da3.ops import gumbel_noise_difference

    z = torch.full((200_000,), 0.8)
    hard = GumbelGate.apply(z, gumbel_noise_difference(z.shape, torch.Generator().manual_seed(0)), 1.0, 0.5)
    assert abs(float(hard.mean()) - float(torch.sigmoid(torch.tensor(0.8)))) < 0.01


def test_inference_mask_is_the_hard_threshold_of_eq1():
    model = _model("da3")
    model.eval()
    mod = model.da3.blocks[1]
    a = torch.rand(3, 4, 12, 12)
    z = model.gate_logits(mod, a)
    assert torch.equal(z > 0, torch.sigmoid(model.section.beta * z) > 0.5)


@pytest.mark.parametrize("k", [1, 3])
def test_skip_path_equals_masked_dense_computation(k):
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 6, 7, 5), torch.randn(4, 6, k, k), torch.randn(4)
    m = (torch.rand(2, 1, 7, 5) > 0.6).float()
    dense = m * F.conv2d(x, w, b, padding=k // 2)
    torch.testing.assert_close(sparse_correction(x, m, w, b), dense)
    assert torch.equal(sparse_correction(x, torch.zeros_like(m), w, b), torch.zeros_like(dense))


def test_custom_backward_ops_match_stock_autograd():
    torch.manual_seed(2)
    model = init_weights_from_seed(build_model(BACKBONE), 0)
    blk = model.stages[1][0]
    with torch.no_grad():
        blk.bn1.running_mean.uniform_(-0.5, 0.5)
        blk.bn1.running_var.uniform_(0.5, 2.0)
    blk.eval()
    for p in blk.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    g = torch.randn(2, 8, 6, 6)
    (ours,) = torch.autograd.grad((packed_relu(frozen_conv_bn(x, blk.conv1, blk.bn1)) * g).sum(), x)
    (ref,) = torch.autograd.grad((torch.relu(blk.bn1(blk.conv1(x))) * g).sum(), x)
    torch.testing.assert_close(ours, ref)
    mask = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)
    # The gated correction: every gradient equals the stock one (float32 storage).
    a = torch.randn(2, 4, 6, 6, requires_grad=True)
    m = (torch.rand(2, 1, 6, 6) > 0.5).float().requires_grad_(True)
    w, b = torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)
    gout = torch.randn(2, 8, 6, 6)
    ours = torch.autograd.grad((GatedCorrection.apply(a, m, w, b, 32) * gout).sum(), (a, m, w, b))
    ref = torch.autograd.grad(((m * F.conv2d(a, w, b, padding=1)) * gout).sum(), (a, m, w, b))
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r)
    # int8 storage: the same forward, gradients within quantisation error.
    ours8 = torch.autograd.grad((GatedCorrection.apply(a, m, w, b, 8) * gout).sum(), (w,))
    torch.testing.assert_close(ours8[0], ref[2], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("options", [{}, {"store_bits": 32}, {"gate": False}, {"correction_kernel": 1}])
def test_saved_for_backward_bytes_equal_the_stated_per_block_count(options):
    model = _model("da3", **options)
    model.train()
    model.generator = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        p.requires_grad_(n in set(trainable_names(model, "da3")))
    x, y = _data(10)
    counter = SavedTensorsCounter(model)
    with counter.step():
        loss = F.cross_entropy(model(torch.as_tensor(x).float() / 255), torch.as_tensor(y))
    loss.backward()
    stated = sum(b.total for b in da3_block_bytes(model.arch_spec, 10)) + head_loss_bytes(model.arch_spec, 10)
    assert counter.last == stated == analytic_training_memory(model.arch_spec, "da3", 10)
    assert da3_block_bytes(model.arch_spec, 10)[0].relu1_mask == 0  # no gradient before block 0's adaptor


def test_da3_training_keeps_frozen_tensors_bit_identical_and_without_grad():
    model = _model("da3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    metrics = train_domain(model, x, y, DA3TrainConfig(method="da3", epochs=2, batch=8, lr=1e-2))
    assert metrics["saved_bytes"] == analytic_training_memory(model.arch_spec, "da3", 8)
    trainable = set(trainable_names(model, "da3"))
    after = model.state_dict()
    for k, v in before.items():
        if k not in trainable:
            assert torch.equal(after[k], v), k  # BN statistics included
    assert any(not torch.equal(after[k], before[k]) for k in trainable if k.startswith("da3."))
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
        assert p.requires_grad  # flags restored
    result = evaluate_domain(model, x, y)
    dense = evaluate_domain(model, x, y, gated=False)
    assert 0 <= result["gate_sparsity"] <= 1 and dense["gate_sparsity"] == 0
    assert result["flops"] <= dense["flops"] + model_gate_flops(model)


def model_gate_flops(model) -> float:
    from shared.da3 import model_flops

    return model_flops(model.arch_spec)["gate"]


EXPECTED = {  # prefixes (or predicates) of the tensors each method may change
    "finetune": lambda k: True,
    "last": lambda k: k.startswith("head."),
    "bias": lambda k: k.startswith("head.") or (k.endswith(".bias") and ("bn" in k or k.endswith("1.bias"))),
    "tinytl": lambda k: k.startswith(("head.", "da3.")) or (k.endswith(".bias") and ("bn" in k or k.endswith("1.bias"))),
    "series": lambda k: k.startswith(("head.", "da3.")),
    "parallel": lambda k: k.startswith(("head.", "da3.")),
    "piggyback": lambda k: k.startswith(("head.", "da3.scores.")),
    "da3": lambda k: k.startswith(("head.", "da3.")),
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_only_its_tensors(method):
    model = _model(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    metrics = train_domain(model, x, y, DA3TrainConfig(method=method, epochs=1, batch=8, lr=1e-2))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(EXPECTED[method](k) for k in changed), sorted(changed)
    assert changed <= set(trainable_names(model, method)) | ({k for k in before if "running" in k or "num_batches" in k} if method == "finetune" else set())
    if method != "finetune":
        assert not any("running" in k for k in changed)
    if method == "finetune":
        assert "stages.0.0.conv1.weight" in changed
    assert metrics["saved_bytes"] > 0 and metrics["trainable_params"] > 0


def test_memory_ordering_and_planning():
    spec = {m: da3_spec(BACKBONE, adaptor=ADAPTOR.get(m, m)) for m in METHODS}
    mem = {m: analytic_training_memory(spec[m], m, 16) for m in METHODS}
    assert mem["last"] < mem["bias"] < mem["da3"] < mem["finetune"]
    budget = analytic_training_memory(spec["da3"], "da3", 8) + 12 * sum(
        p.numel() for n, p in build_model(spec["da3"]).named_parameters() if n in set(adaptor_tensor_names(spec["da3"])))
    assert plan_training(spec["da3"], budget, batch=64) == 8
    assert plan_training(spec["da3"], None, batch=64) == 64
    with pytest.raises(DA3Refused, match="batch 1"):
        plan_training(spec["da3"], 1000, batch=8)


def test_spec_and_input_errors_are_clear():
    with pytest.raises(DA3Error, match="resnet"):
        da3_spec(ArchSpec("mlp", (1, 12, 12), 3))
    with pytest.raises(DA3Error, match="unknown keys"):
        da3_spec(BACKBONE, colour="red")
    with pytest.raises(DA3Error, match="adaptor"):
        da3_spec(BACKBONE, adaptor="lora")
    with pytest.raises(DA3Error, match="odd"):
        da3_spec(BACKBONE, gate_kernel=2)
    with pytest.raises(ValueError, match="temperature"):  # a bad section inside an artefact's spec
        ArchSpec.from_dict({**BACKBONE.__dict__, "extra": {"da3": {"temperature": -1}}})
    with pytest.raises(DA3Error, match="unknown method"):
        DA3TrainConfig(method="lora")
    model = _model("da3")
    x, y = _data()
    with pytest.raises(DA3Error, match="adaptor='none'"):
        train_domain(model, x, y, DA3TrainConfig(method="bias"))
    with pytest.raises(DA3Error, match="resize"):
        train_domain(model, x[:, :, :8, :8], y, DA3TrainConfig())
    with pytest.raises(DA3Error, match="labels"):
        train_domain(model, x, y + 5, DA3TrainConfig())
    assert resize_images(x[:, 0, :8, :8], (12, 12)).shape == (24, 1, 12, 12)
