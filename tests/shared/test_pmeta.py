"""p-Meta: Alg. 4.1, Eq. 4.10, the sparse on-device engine and its memory accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.models.spec import parameter_count
from shared.pmeta import (
    AdaptConfig,
    MetaTrainConfig,
    PMetaError,
    PMetaRefused,
    TaskSampler,
    adapt,
    attention_score,
    backbone_layers,
    clip_and_renormalise,
    lasso_penalty,
    meta_train,
    plan_adaptation,
    pmeta_spec,
)
from shared.pmeta.attention import weight_mask
from shared.pmeta.inner import InnerRule, adapt_functional, backbone_params
from shared.pmeta.ops import LayerStats, ReluMaxPool, SparseConv, SparseGroupNorm


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(attention: bool = True, shape=(12, 12), channels: int = 8, blocks: int = 2, seed: int = 1, **kw):
    model = build_model(pmeta_spec(shape, 3, channels=channels, blocks=blocks, attention=attention, **kw))
    init_weights_from_seed(model, seed)
    return model


def _support(n: int = 6, shape=(12, 12), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.arange(n) % 3


# --- Alg. 4.1 -------------------------------------------------------------------------------
def test_clip_and_renormalise_on_fixed_inputs():
    pi = torch.tensor([0.125, 0.25, 0.125, 0.5])
    assert torch.equal(clip_and_renormalise(pi, 0.0), pi * 4)  # rho = 0: normalise, rescale only
    # cumsum of the sorted 0.125, 0.125, 0.25, 0.5 first reaches 0.2 at the 2nd entry
    assert torch.allclose(clip_and_renormalise(pi, 0.2), torch.tensor([0, 0.25, 0, 0.5]) / 0.75 * 4)
    assert torch.equal(clip_and_renormalise(pi, 0.3), torch.tensor([0.0, 0.0, 0.0, 4.0]))
    assert torch.equal(clip_and_renormalise(pi, 1.0), torch.zeros(4))  # rho = 1: nothing updated


def test_clip_and_renormalise_backward_is_straight_through():
    pi = torch.tensor([0.125, 0.25, 0.125, 0.5], requires_grad=True)
    v = torch.tensor([1.0, -2.0, 3.0, 0.5])
    (clip_and_renormalise(pi, 0.3) * v).sum().backward()
    ref = pi.detach().clone().requires_grad_(True)
    (ref / ref.sum() * 4 * v).sum().backward()
    assert torch.allclose(pi.grad, ref.grad)


# --- Eq. 4.10 -------------------------------------------------------------------------------
def test_lasso_gradient_by_hand_on_a_tiny_model():
    """One first-order inner step: dL/dα_l = -<∇_{w_l} L_q(w'), ∇_{w_l} L_s(w)> + λ m(x_{l-1}) sign(α_l)."""
    model = _model(attention=False, shape=(4, 4), channels=2, blocks=1, inner_steps=1, init_alpha=0.1)
    layers = backbone_layers(model.arch_spec)
    xs, ys = _support(3, (4, 4), seed=1)
    xq, yq = _support(3, (4, 4), seed=2)
    alpha = model.pmeta.alpha
    rule = InnerRule(alpha, None, 0.0, 0.0, 1)
    params = backbone_params(model, layers)
    fast = adapt_functional(model, layers, params, rule, xs, ys, create_graph=False)
    lam = 1e-3
    objective = F.cross_entropy(torch.func.functional_call(model, fast, (xq,)), yq) + lasso_penalty(alpha, layers, lam)
    (g_alpha,) = torch.autograd.grad(objective, [alpha])
    # by hand
    names = list(params)
    w = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    gs = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, w, (xs,)), ys), list(w.values()))
    w2 = {n: (w[n] - 0.1 * g).detach().requires_grad_(True) for n, g in zip(names, gs, strict=True)}
    gq = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, w2, (xq,)), yq), list(w2.values()))
    for layer in layers:
        i = [names.index(n) for n in layer.param_names]
        expected = -sum(float((gq[j] * gs[j]).sum()) for j in i) + lam * layer.input_words
        assert g_alpha[layer.index, 0].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert [layer.input_words for layer in layers] == [16, 32, 2 * 2 * 2]  # m(x_{l-1}): image, x̂, pooled


# --- the sparse engine ----------------------------------------------------------------------
def test_sparse_conv_and_norm_gradients_equal_the_masked_dense_ones():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    r = torch.randn(2, 4, 5, 5)  # dL/dy
    w, b = torch.randn(4, 6, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    fw, bw = (0.2 * torch.randn(6, 6), torch.zeros(6)), (torch.randn(4, 4), torch.randn(4))
    stats = LayerStats()
    (SparseConv.apply(x, w, b, 0, fw, bw, 0.3, 0.0, stats) * r).sum().backward()
    wd, bd = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    (F.conv2d(x, wd, bd, padding=1) * r).sum().backward()
    g_fw, g_bw = attention_score(x, *fw, 0.3), attention_score(r, *bw, 0.0)
    mw, mb = weight_mask("conv", g_fw, g_bw)
    assert 1 < int((g_fw > 0).sum()) < 6 and stats.mu_fw[0] == pytest.approx((g_fw > 0).float().mean().item())
    assert torch.allclose(w.grad, mw * wd.grad, atol=1e-5) and torch.allclose(b.grad, mb * bd.grad, atol=1e-5)
    # group norm, once as the lowest stepping layer (sparse x̂) and once with a gradient to pass on
    for need_x in (False, True):
        xn = torch.randn(2, 4, 5, 5, requires_grad=need_x)
        gw_, gb_ = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
        fwn, bwn = (torch.randn(4, 4), torch.randn(4)), (torch.randn(4, 4), torch.randn(4))
        (SparseGroupNorm.apply(xn, gw_, gb_, 1, 2, fwn, bwn, 0.3, 0.0, LayerStats()) * r).sum().backward()
        xd = xn.detach().clone().requires_grad_(need_x)
        wn, bn = gw_.detach().clone().requires_grad_(True), gb_.detach().clone().requires_grad_(True)
        (F.group_norm(xd, 2, wn, bn) * r).sum().backward()
        mw, mb = weight_mask("norm", attention_score(F.group_norm(xn.detach(), 2), *fwn, 0.3),
                             attention_score(r, *bwn, 0.0))  # fmt: skip
        assert torch.allclose(gw_.grad, mw * wn.grad, atol=1e-5) and torch.allclose(gb_.grad, mb * bn.grad, atol=1e-5)
        if need_x:
            assert torch.allclose(xn.grad, xd.grad, atol=1e-5)


def test_fused_relu_maxpool_matches_torch_on_odd_sizes():
    y = torch.randn(2, 3, 7, 7, requires_grad=True)
    g = torch.randn(2, 3, 3, 3)
    out = ReluMaxPool.apply(y)
    (out * g).sum().backward()
    yd = y.detach().clone().requires_grad_(True)
    ref = F.max_pool2d(F.relu(yd), 2)
    (ref * g).sum().backward()
    assert torch.equal(out, ref) and torch.allclose(y.grad, yd.grad)


def test_device_adaptation_equals_the_meta_training_inner_loop():
    model = _model(attention=True, rho_fw=0.3, channels=16)  # 2 channels per norm group
    layers = backbone_layers(model.arch_spec)
    x, y = _support(6)
    result = adapt(model, x, y, AdaptConfig(sample_batch=6))  # one batch: same γ as meta-training
    rule = InnerRule(model.pmeta.alpha.detach(), model.pmeta.att, 0.3, 0.0, 5)
    fast = adapt_functional(model, layers, backbone_params(model, layers), rule, x, y, create_graph=False)
    assert set(result.state) == set(fast)
    for name, t in result.state.items():
        assert torch.allclose(t, fast[name].detach(), atol=1e-5), name


def test_adapt_does_not_mutate_the_model_and_matches_the_analytic_saved_bytes():
    model = _model(attention=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _support(6)
    result = adapt(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.steps == 5 and result.state and result.saved_bytes > 0
    assert abs(result.saved_bytes - result.predicted_saved_bytes) <= 0.1 * result.predicted_saved_bytes
    assert result.analytic_bytes == result.analytic["total"] > result.saved_bytes
    assert all(0.0 <= mu < 1.0 for i, mu in result.mu_fw.items() if i < 4)  # rho_fw = 0.3 drops channels


def test_layers_with_zero_step_size_save_nothing():
    model = _model(attention=False)
    x, y = _support(6)
    with torch.no_grad():
        model.pmeta.alpha.zero_()
    none = adapt(model, x, y)
    assert none.saved_bytes == 0 and none.state == {} and none.flops == 0
    with torch.no_grad():
        model.pmeta.alpha[-1] = 0.1  # only the output layer steps (ANIL)
    head = adapt(model, x, y)
    layers = backbone_layers(model.arch_spec)
    # the head's input (1 sample x 8 channels x 3 x 3, float32) plus the loss's log-probabilities,
    # target and total weight
    assert head.saved_bytes == layers[-1].input_words * 4 + 3 * 4 + 8 + 4 == head.predicted_saved_bytes
    assert set(head.state) == {"head.weight", "head.bias"}
    with torch.no_grad():
        model.pmeta.alpha[2] = 0.1  # + the second conv: everything above it keeps its backward state
    more = adapt(model, x, y)
    assert more.saved_bytes == more.predicted_saved_bytes > head.saved_bytes


def test_attention_saves_only_the_selected_channels():
    x, y = _support(6)
    dense = adapt(_model(attention=True, rho_fw=0.0), x, y)
    sparse = adapt(_model(attention=True, rho_fw=0.6), x, y)
    assert sparse.analytic["inputs"] < dense.analytic["inputs"]
    assert sparse.saved_bytes < dense.saved_bytes and sparse.flops < dense.flops


def test_plan_adaptation_fits_the_budget_or_refuses():
    model = _model(attention=True)
    assert plan_adaptation(model, 6, None).sample_batch == 6
    x, y = _support(6)
    one = adapt(model, x, y, AdaptConfig(sample_batch=1))
    plan = plan_adaptation(model, 6, one.analytic_bytes + 1)
    assert plan.sample_batch < 6
    with pytest.raises(PMetaRefused, match="memory budget"):
        plan_adaptation(model, 6, 1000)


# --- family, spec, meta-training ------------------------------------------------------------
def test_pmeta_family_spec_build_and_seeded_init():
    spec = pmeta_spec((28, 28), 5)
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and parameter_count(spec) == 28485
    a, b = build_model(spec), build_model(again)
    init_weights_from_seed(a, 7)
    init_weights_from_seed(b, 7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["pmeta.alpha"].shape == (9, 5) and torch.all(sa["pmeta.alpha"] == 0.01)
    assert "pmeta.att.8.fw.weight" not in sa and sa["pmeta.att.1.fw.weight"].shape == (32, 32)
    assert torch.all(sa["features.1.weight"] == 1) and torch.all(sa["features.1.bias"] == 0)
    for bad in ({"inner_steps": 0}, {"rho_fw": 1.5}, {"attention": "yes"}, {"extra_key": 1}):
        with pytest.raises(ValueError):
            ArchSpec("conv4", (28, 28), 5, hidden=(32,) * 4, extra={"pmeta": bad})


def test_meta_train_steps_and_keeps_alpha_non_negative():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 12, 12), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 10)
    sampler = TaskSampler(x, labels, ways=3, shots=1, queries=2, seed=0)
    model = _model(attention=True)
    alpha0 = model.pmeta.alpha.detach().clone()
    for second_order in (False, True):
        cfg = MetaTrainConfig(method="pmeta_att", ways=3, shots=1, queries=2, meta_batch=2, iterations=2,
                              second_order=second_order, lasso_lambda=0.1)  # fmt: skip
        metrics = meta_train(model, sampler, cfg)
        assert np.isfinite(metrics["loss"])
    alpha = model.pmeta.alpha.detach()
    assert torch.all(alpha >= 0) and not torch.equal(alpha, alpha0)
    with pytest.raises(PMetaError, match="attention"):
        meta_train(model, sampler, MetaTrainConfig(method="maml", ways=3, shots=1, queries=2, iterations=1))
    anil = _model(attention=False)
    meta_train(anil, sampler, MetaTrainConfig(method="anil", ways=3, shots=1, queries=2, iterations=1, inner_lr=0.2))
    assert torch.all(anil.pmeta.alpha[:-1] == 0) and torch.allclose(anil.pmeta.alpha[-1].detach(), torch.tensor(0.2))


def test_conv4_spec_validation_and_parameter_count():
    spec = ArchSpec("conv4", (1, 20, 20), 4, hidden=(8, 16))
    model = build_model(spec)
    assert parameter_count(spec) == sum(t.numel() for t in model.state_dict().values())
    assert model(torch.zeros(2, 1, 20, 20)).shape == (2, 4) and model(torch.zeros(2, 20, 20)).shape == (2, 4)
    for bad in (dict(input_shape=(784,)), dict(channels=(8,)), dict(input_shape=(4, 4), hidden=(8,) * 3)):
        with pytest.raises(ValueError):
            ArchSpec(**{"kind": "conv4", "input_shape": (28, 28), "num_classes": 4, "hidden": (8,), **bad})
    with pytest.raises(PMetaError, match="conv4"):
        backbone_layers(ArchSpec("mlp", (784,), 4))
