"""DPU rounds on real data (scikit-learn digits): masks, rewinding, skip, re-init, pluggables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.dpu import (
    DPUConfig,
    DPUConfigError,
    MaskedOptimizer,
    global_topk_mask,
    num_selected,
    partial_update,
    seeded_state,
)
from shared.dpu.steps import Candidate
from shared.dpu.update import ShadowChain, _advance_shadow
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.tensors import clone_state, tensors_hash, to_model_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mlp(seed: int = 0) -> nn.Module:
    model = build_model(ArchSpec("mlp", (1, 8, 8), 10, hidden=(48,)))
    return init_weights_from_seed(model, seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def _cfg(**kw) -> DPUConfig:
    base = {"k": 0.05, "epochs": 6, "batch_size": 32, "lr": 3e-3, "seed": 1}
    return DPUConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def deployed(digits):
    """w^{r-1}: an MLP fully trained on the first 200 training samples."""
    model = _mlp()
    r = partial_update(
        model, model.state_dict(), digits.x_train[:200], digits.y_train[:200],
        digits.x_test, digits.y_test, _cfg(method="full", epochs=15),
    )  # fmt: skip
    assert not r.skipped
    return r.state


@pytest.mark.parametrize("method", ["dpu", "gcpu", "rpu"])
def test_mask_has_exactly_k_i_ones_and_rewound_weights_equal_w_bit_for_bit(
    digits, deployed, method
):
    model = _mlp()
    n = 600
    r = partial_update(
        model, deployed, digits.x_train[:n], digits.y_train[:n], digits.x_test, digits.y_test,
        _cfg(method=method), reinit=False,
    )  # fmt: skip
    assert r.num_partial == 64 * 48 + 48 * 10
    assert r.nnz == num_selected(0.05, r.num_partial) == sum(int(m.sum()) for m in r.mask.values())
    assert r.k_effective == pytest.approx(0.05, abs=1 / r.num_partial)
    assert not r.skipped and r.val_accuracy > r.base_val_accuracy
    assert tensors_hash(r.diff_base) == tensors_hash(deployed)
    changed = 0
    for name in r.partial_names:
        keep = r.mask[name]
        assert torch.equal(_bits(r.state[name][~keep]), _bits(deployed[name][~keep]))
        changed += int((r.state[name][keep] != deployed[name][keep]).sum())
    assert 0 < changed <= r.nnz
    # Biases are updated densely.
    assert not torch.equal(r.state["net.1.bias"], deployed["net.1.bias"])
    # The model holds the shipped state afterwards.
    assert tensors_hash(clone_state(model.state_dict())) == tensors_hash(r.state)


def test_dpu_beats_random_partial_updating(digits, deployed):
    accs = {}
    for method in ("dpu", "rpu"):
        r = partial_update(
            _mlp(), deployed, digits.x_train[:800], digits.y_train[:800], digits.x_test,
            digits.y_test, _cfg(method=method, k=0.02), reinit=False,
        )  # fmt: skip
        accs[method] = r.val_accuracy
    assert accs["dpu"] > accs["rpu"]


def test_magnitude_pruning_ships_a_sparse_model(digits):
    model = _mlp()
    r = partial_update(
        model, model.state_dict(), digits.x_train[:400], digits.y_train[:400], digits.x_test,
        digits.y_test, _cfg(method="magnitude", k=0.1),
    )  # fmt: skip
    for name in r.partial_names:
        assert int((r.state[name] != 0).sum()) <= int(r.mask[name].sum())
        assert torch.all(r.state[name][~r.mask[name]] == 0)
        assert torch.all(r.diff_base[name] == 0)
    assert r.nnz == num_selected(0.1, r.num_partial)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
    ],
    ids=["adam-wd", "adamw", "sgd-momentum-wd"],
)
def test_masked_optimizer_moves_nothing_outside_the_mask(digits, make_opt):
    model = _mlp(3)
    weight = model.net[1].weight
    mask = global_topk_mask(
        {"w": torch.rand(weight.shape, generator=torch.Generator().manual_seed(0))}, 0.2
    )["w"]
    before = weight.detach().clone()
    bias_before = model.net[1].bias.detach().clone()
    opt = MaskedOptimizer(make_opt(list(model.parameters())), [(weight, mask)])
    x = to_model_input(digits.x_train[:64])
    y = torch.as_tensor(digits.y_train[:64])
    for step in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step % 3 == 2:  # a gradient-free step: momentum / weight decay alone would move weights
            opt.zero_grad(set_to_none=False)
        opt.step()
    assert torch.equal(_bits(weight.detach()[~mask]), _bits(before[~mask]))
    assert (weight.detach()[mask] != before[mask]).float().mean() > 0.9
    assert not torch.equal(model.net[1].bias.detach(), bias_before)


def test_masked_optimizer_rejects_foreign_parameters_and_bad_masks():
    model, other = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DPUConfigError, match="not managed"):
        MaskedOptimizer(
            opt, [(other.net[1].weight, torch.ones_like(other.net[1].weight, dtype=torch.bool))]
        )
    with pytest.raises(DPUConfigError, match="bool tensor of shape"):
        MaskedOptimizer(opt, [(model.net[1].weight, torch.ones(3, dtype=torch.bool))])


def test_skip_if_worse_ships_nothing_and_says_why(digits, deployed):
    # Retraining only on the 0s makes every candidate worse than the deployed model.
    zeros = np.flatnonzero(digits.y_train == 0)[:40]
    model = _mlp()
    r = partial_update(
        model, deployed, digits.x_train[zeros], digits.y_train[zeros], digits.x_test,
        digits.y_test, _cfg(lr=0.05, epochs=5), reinit=False,
    )  # fmt: skip
    assert r.skipped and r.action == "skip"
    assert "does not beat the deployed" in r.skip_reason
    assert r.val_accuracy <= r.base_val_accuracy
    assert tensors_hash(r.state) == tensors_hash(deployed)
    assert tensors_hash(clone_state(model.state_dict())) == tensors_hash(deployed)
    assert r.reinit_seed is None


def test_forced_reinitialisation_is_reproducible_and_recorded(digits, deployed):
    model = _mlp()
    assert tensors_hash(seeded_state(model, 7)) == tensors_hash(seeded_state(_mlp(5), 7))
    assert tensors_hash(seeded_state(model, 7)) != tensors_hash(seeded_state(model, 8))
    runs = [
        partial_update(
            _mlp(),
            deployed,
            digits.x_train[:900],
            digits.y_train[:900],
            digits.x_test,
            digits.y_test,
            _cfg(k=0.2, lr=1e-2),
            reinit=True,
            reinit_seed=7,
        )  # fmt: skip
        for _ in range(2)
    ]
    r = runs[0]
    assert tensors_hash(r.state) == tensors_hash(runs[1].state)  # same data and seed -> same bits
    # 4.5x the data of the deployed model: the re-initialised candidate wins and is shipped.
    assert not r.skipped and r.reinit_seed == 7 and r.reinit_started
    assert tensors_hash(r.diff_base) == tensors_hash(seeded_state(model, 7))
    assert r.nnz == num_selected(0.2, r.num_partial)
    for name in r.partial_names:
        keep = r.mask[name]
        assert torch.equal(_bits(r.state[name][~keep]), _bits(r.diff_base[name][~keep]))


def test_shadow_chain_starts_when_data_doubles_and_trains_next_to_the_deployed_chain(
    digits, deployed
):
    # k=0 and one epoch from random weights trains only biases: it cannot beat the deployed
    # model, so the shadow chain is kept (not shipped) and the deployed chain ships.
    r1 = partial_update(
        _mlp(), deployed, digits.x_train[:500], digits.y_train[:500], digits.x_test,
        digits.y_test, _cfg(k=0.0, epochs=1), n_at_last_init=200, reinit_seed=3,
    )  # fmt: skip
    assert r1.reinit_started and r1.next_n_at_last_init(200) == 500
    assert r1.reinit_seed is None and r1.shadow is not None
    assert r1.shadow.seed == 3 and r1.shadow.rounds == 1
    assert r1.skipped or tensors_hash(r1.diff_base) == tensors_hash(deployed)
    shadow_before = tensors_hash(r1.shadow.state)
    assert shadow_before != tensors_hash(seeded_state(_mlp(), 3))  # its biases trained
    r2 = partial_update(
        _mlp(), r1.state, digits.x_train[:700], digits.y_train[:700], digits.x_test,
        digits.y_test, _cfg(k=0.05, epochs=2), n_at_last_init=500, shadow=r1.shadow,
    )  # fmt: skip
    assert not r2.reinit_started and r2.next_n_at_last_init(500) == 500
    assert r2.steps == 2 * 2 * 2 * 22  # two candidates, two steps, 2 epochs of 22 batches
    if r2.reinit_seed is None:  # the deployed chain won this round
        assert r2.shadow.rounds == 2 and tensors_hash(r2.shadow.state) != shadow_before
    else:
        assert r2.shadow is None and r2.reinit_seed == 3
    # The rule firing again replaces the running shadow chain.
    r3 = partial_update(
        _mlp(), r1.state, digits.x_train[:1100], digits.y_train[:1100], digits.x_test,
        digits.y_test, _cfg(k=0.0, epochs=1), n_at_last_init=500, shadow=r1.shadow,
    )  # fmt: skip
    assert r3.reinit_started and "replaced the shadow chain of 1 rounds" in r3.notes[0]


def test_shadow_promotion_ships_every_weight_the_chain_moved():
    model = _mlp()
    seeded = seeded_state(model, 7)
    trained = clone_state(seeded)
    trained["net.1.weight"][0, :3] += 1.0  # moved over the shadow's rounds
    trained["net.3.weight"][2, 5] -= 1.0
    trained["net.1.bias"] += 0.5
    shadow = ShadowChain(7, seeded, rounds=2)
    names = ("net.1.weight", "net.3.weight")
    warm = Candidate(clone_state(seeded), {}, {}, 0.80)
    beats = lambda c: c.val > 0.75  # noqa: E731
    chosen, left, seed = _advance_shadow(
        model, shadow, Candidate(trained, {}, {}, 0.90), warm, beats, 0.75, names, []
    )
    assert left is None and seed == 7
    assert tensors_hash(chosen.diff_base) == tensors_hash(seeded)
    assert (
        int(chosen.mask["net.1.weight"].sum()) == 3 and int(chosen.mask["net.3.weight"].sum()) == 1
    )
    # Not better than the deployed chain's own candidate: keep training the shadow chain.
    chosen, left, seed = _advance_shadow(
        model, shadow, Candidate(trained, {}, {}, 0.78), warm, beats, 0.75, names, []
    )
    assert chosen is warm and seed is None and left.rounds == 3 and left.state is trained


def test_losing_reinitialisation_falls_back_to_the_deployed_weights(digits, deployed):
    r = partial_update(
        _mlp(), deployed, digits.x_train[:500], digits.y_train[:500], digits.x_test,
        digits.y_test, _cfg(k=0.0, epochs=1, reinit_mode="fallback"), n_at_last_init=200,
    )  # fmt: skip
    assert r.reinit_started and r.reinit_seed is None and r.shadow is None
    assert "retrained from the deployed weights" in r.notes[0]
    assert r.next_n_at_last_init(200) == 500  # next attempt once the data doubles again
    assert r.skipped or tensors_hash(r.diff_base) == tensors_hash(deployed)


def test_no_reinit_below_twice_the_data(digits, deployed):
    r = partial_update(
        _mlp(), deployed, digits.x_train[:400], digits.y_train[:400], digits.x_test,
        digits.y_test, _cfg(epochs=2), n_at_last_init=200,
    )  # fmt: skip
    assert not r.reinit_started and r.reinit_seed is None and r.shadow is None


def test_pluggable_loss_progress_and_param_filter(digits, deployed):
    calls = {"loss": 0}
    progress: list[tuple[int, int, dict]] = []

    def smoothed(model, x, y):
        calls["loss"] += 1
        return F.cross_entropy(model(to_model_input(x)), y, label_smoothing=0.1)

    cfg = _cfg(steps=12, eval_every=4)
    r = partial_update(
        _mlp(), deployed, digits.x_train[:300], digits.y_train[:300], digits.x_test, digits.y_test,
        cfg, loss_fn=smoothed, progress=lambda s, t, m: progress.append((s, t, m)),
        param_filter=lambda name, p: name == "net.3.weight", reinit=False,
    )  # fmt: skip
    assert calls["loss"] == 24 == r.steps
    assert [s for s, _, _ in progress] == list(range(1, 25))
    assert {t for _, t, _ in progress} == {24}
    assert {m["phase"] for _, _, m in progress} == {1.0, 2.0}
    assert sum("val_accuracy" in m for _, _, m in progress) == 3  # steps 4, 8, 12 of step 2
    assert r.partial_names == ("net.3.weight",) and r.num_partial == 480
    # Everything outside the filter is dense: the first layer moved freely.
    assert not r.skipped
    assert (r.state["net.1.weight"] != deployed["net.1.weight"]).float().mean() > 0.5


def test_cnn_with_batchnorm_keeps_norm_layers_dense(digits):
    model = init_weights_from_seed(
        build_model(ArchSpec("cnn", (1, 8, 8), 10, hidden=(16,), channels=(4, 8))), 0
    )
    base = clone_state(model.state_dict())
    r = partial_update(
        model, base, digits.x_train[:257], digits.y_train[:257], digits.x_test, digits.y_test,
        _cfg(k=0.1, epochs=3, optimizer="sgd", lr=0.05, weight_decay=1e-4),
    )  # fmt: skip
    assert not any("running" in n or n.endswith("bias") for n in r.partial_names)
    assert not torch.equal(
        r.candidate_state["features.1.running_mean"], base["features.1.running_mean"]
    )
    assert r.nnz == num_selected(0.1, r.num_partial)


def test_inputs_are_validated(digits):
    model = _mlp()
    with pytest.raises(DPUConfigError, match="training data must be"):
        partial_update(model, model.state_dict(), digits.x_train[:10], digits.y_train[:9],
                       digits.x_test, digits.y_test, _cfg())  # fmt: skip
    bad_state = dict(model.state_dict())
    bad_state.pop("net.1.bias")
    with pytest.raises(DPUConfigError, match=r"missing \['net.1.bias'\]"):
        partial_update(model, bad_state, digits.x_train[:10], digits.y_train[:10],
                       digits.x_test, digits.y_test, _cfg())  # fmt: skip
