"""ALQ (shared.alq): sketching, the AMSGrad-style steps, α-domain pruning to a bit budget,
bit-packed storage and the runners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shared.alq import (
    ALQConfig,
    StepConfig,
    TensorState,
    alq_quantize,
    bases_step,
    expand,
    from_groups,
    model_bytes,
    nearest_codes,
    pack,
    sketch,
    to_groups,
    unpack,
)
from shared.alq.runner import build_runner, resident_weight_bytes
from shared.alq.steps import alpha_step
from shared.alq.train import prune_global


def _rel_err(mb, w) -> float:
    return float(((mb.reconstruct() - w) ** 2).sum() / (w**2).sum())


@pytest.mark.parametrize("structure,shape", [("kernelwise", (6, 4, 3, 3)), ("pointwise", (6, 4, 3, 3)),
                                             ("channelwise", (10, 30)), ("subchannelwise(3)", (10, 30))])  # fmt: skip
def test_groups_round_trip(structure, shape):
    w = torch.randn(shape)
    assert torch.equal(from_groups(to_groups(w, structure), structure, shape), w)


def test_sketch_error_falls_with_every_basis_and_respects_its_invariants():
    w = torch.randn(12, 8, 5, 5)
    errs = []
    for i_max in range(1, 7):
        mb = sketch(w, "kernelwise", i_max)
        assert int(mb.widths.max()) == i_max and (mb.alpha >= 0).all()
        assert set(mb.B.unique().tolist()) <= {-1.0, 1.0}
        errs.append(_rel_err(mb, w))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert errs[0] < 0.4 and errs[-1] < 0.01
    # A threshold stops groups early: fewer bits, error within the threshold per group.
    loose = sketch(w, "kernelwise", 6, sigma=0.05)
    assert loose.average_bits() < 6
    res = ((to_groups(w, "kernelwise") - loose.grouped()) ** 2).sum(1)
    assert (res <= 0.05 * (to_groups(w, "kernelwise") ** 2).sum(1) + 1e-6).all()


def test_nearest_codes_is_the_exhaustive_argmin():
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(5, 3, generator=gen)
    alpha[1, 2] = 0  # an inactive coordinate
    target = torch.randn(5, 40, generator=gen)
    B = nearest_codes(alpha, target)
    got = torch.einsum("gkn,gk->gn", B, alpha)
    codes = torch.tensor([[(c >> (2 - i)) & 1 for i in range(3)] for c in range(8)]).float() * 2 - 1
    all_values = alpha @ codes.T  # (5, 8)
    best = (all_values.unsqueeze(1) - target.unsqueeze(2)).abs().min(dim=2).values
    assert torch.allclose((got - target).abs(), best, atol=1e-6)


def test_optimisation_steps_reduce_a_quadratic_loss():
    """ℓ = ½|ŵ - w*|²: Alg. 2.4 and Alg. 2.3 steps move ŵ toward w* (the reconstruction
    error to the weights the loss wants falls through the optimisation)."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(16, 64, generator=gen)
    start = w_star + 0.5 * torch.randn(16, 64, generator=gen)
    st = TensorState(sketch(start, "channelwise", 3))
    cfg = StepConfig(lr=0.02)

    def loss() -> float:
        return float(((st.mb.reconstruct() - w_star) ** 2).sum())

    before = loss()
    for _ in range(60):
        bases_step(st, st.mb.grouped() - to_groups(w_star, "channelwise"), cfg)
    mid = loss()
    for _ in range(60):
        alpha_step(st, st.mb.grouped() - to_groups(w_star, "channelwise"), cfg)
    assert mid < 0.8 * before and loss() <= mid * 1.001
    assert int(st.mb.widths.max()) == 3 and (st.mb.alpha >= 0).all()


def test_pruning_removes_the_cheapest_coordinates_within_the_quota():
    st = {"a": TensorState(sketch(torch.randn(4, 10), "channelwise", 3)),
          "b": TensorState(sketch(torch.randn(2, 50), "channelwise", 3))}  # fmt: skip
    scores = {"a": torch.arange(12.0).reshape(4, 3), "b": torch.full((2, 3), 0.5)}
    # per bit: a's coordinates cost 10 bits (f/10 = 0, 0.1, ...), b's 50 (f/50 = 0.01)
    removed = prune_global(st, scores, 60, "per_bit")
    assert removed == 60  # a[0,0] (10 bits) + one of b's (50 bits)
    assert int(st["a"].mb.widths.sum()) == 11 and int(st["b"].mb.widths.sum()) == 5
    assert prune_global(st, {"a": scores["a"], "b": scores["b"]}, 5, "per_bit") == 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _data(n: int = 96):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=gen) * 0.3
    for k in range(3):
        x[y == k, 0, 2 * k : 2 * k + 2, :] += 1.5
    return x, y


@pytest.mark.parametrize("ranking", ["per_bit", "thesis"])
def test_alq_pipeline_meets_the_bit_budget_and_keeps_the_model_consistent(ranking):
    torch.manual_seed(0)
    model = _Tiny()
    x, y = _data()
    cfg = ALQConfig(target_bits=1.5, i_max=4, outer=2, init_epochs=1, bases_epochs=1,
                    alpha_epochs=1, final_epochs=1, batch_size=32, lr=1e-2, ranking=ranking,
                    structures={"conv.weight": "kernelwise", "fc.weight": "subchannelwise(2)"})  # fmt: skip
    trace: list = []
    mbs = alq_quantize(model, lambda i: (x[i], y[i]), len(y), cfg, log=lambda p, m: trace.append((p, m)))
    bits = [m["bits"] for p, m in trace]
    assert bits[0] == 4.0 and all(a >= b for a, b in zip(bits, bits[1:], strict=False))
    if ranking == "per_bit":  # the budget is in bits per weight
        n_w = sum(mb.numel for mb in mbs.values())
        total = sum(int(mb.widths.sum()) * mb.group_size for mb in mbs.values())
        assert total / n_w <= 1.5
    else:  # the thesis's budget: coordinates per group
        assert sum(int(mb.widths.sum()) for mb in mbs.values()) <= 1.5 * sum(mb.groups for mb in mbs.values())
    params = dict(model.named_parameters())
    for name, mb in mbs.items():
        assert torch.equal(params[name].detach(), mb.reconstruct())
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc > 0.9  # three separable bands survive 1.5-bit weights


def test_storage_round_trips_and_counts_bytes_exactly():
    w = torch.randn(10, 64)
    mb = sketch(w, "channelwise", 4)
    mb.active[0, 1:] = False  # group 0 keeps one basis, group 1 none
    mb.active[1] = False
    mb.canonicalise()
    pt = pack(mb, "fp32")
    back = unpack(pt)
    assert torch.equal(back.reconstruct(), mb.reconstruct())
    widths = mb.widths.numpy()
    assert pt.nbytes == (10 + 1) // 2 + 4 * widths.sum() + (int(widths.sum()) * 64 + 7) // 8
    half = pack(mb)  # fp16 coordinates
    assert half.nbytes == pt.nbytes - 2 * widths.sum()
    sizes = model_bytes({"fc.weight": half}, {"fc.weight": w, "fc.bias": torch.zeros(10)})
    assert sizes == {"quantised": half.nbytes, "other": 40, "total": half.nbytes + 40}


def test_runners_compute_what_the_expanded_model_computes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 3))
    conv = _Tiny()
    x, _ = _data(8)
    for net, structures in ((model, {"1.weight": "subchannelwise(2)", "3.weight": "channelwise"}),
                            (conv, {"conv.weight": "kernelwise", "fc.weight": "channelwise"})):  # fmt: skip
        packed = {}
        for name, s in structures.items():
            mb = sketch(dict(net.named_parameters())[name].detach(), s, 3)
            packed[name] = pack(mb, "fp32")
            with torch.no_grad():
                dict(net.named_parameters())[name].copy_(expand(packed[name]))
        with torch.no_grad():
            ref = net.eval()(x)
        for mode in ("expanded", "packed", "bitplane"):
            runner = build_runner(net, packed, mode)
            with torch.no_grad():
                assert torch.allclose(runner(x), ref, atol=1e-5), mode
        packed_bytes = sum(p.nbytes for p in packed.values())
        assert resident_weight_bytes(build_runner(net, packed, "packed")) < 2 * sum(p.numel for p in packed.values())
        assert resident_weight_bytes(build_runner(net, packed, "expanded")) == 4 * sum(
            p.numel for p in packed.values())
    assert np.isfinite(packed_bytes)
