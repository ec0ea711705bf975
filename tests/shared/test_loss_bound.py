"""The divergence bound of the shared loop (shared/loop.py) and how a round sets it: a loss
above the bound in force fails the loop before that step's update, naming the step and the
loss; the bound reaches every trainer built on the loop, and only in the thread that set it;
a round's bound is ``max_loss_factor`` x its objective's chance-level loss."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import shared.dpu as dpu
from server.training.dpu import DPUParams
from server.training.full import FullParams
from server.training.policy import DEFAULT_MAX_LOSS_FACTOR, loss_bound
from shared.dress.loops import TensorData, cross_entropy, sgd_epochs
from shared.dress.loss import dress_loss
from shared.loop import LossBound, TrainingDivergedError, active_loss_bound, bound_loss, run_loop
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.objectives import objective_for
from shared.tensors import clone_state
from shared.training import TrainConfig, train_supervised

MLP = ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,))
DRESS_MLP = ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,), extra={"dress": {"sparsities": [0.5, 0.8]}})
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _problem(n: int = 40, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g) * scale
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(6, 2)
    return model, x, y, lambda idx: (x[idx], y[idx])


def _ce(m, xb, yb):
    return F.cross_entropy(m(xb), yb)


def test_a_loss_above_the_bound_fails_before_its_update_naming_step_and_loss():
    model, x, y, fetch = _problem()
    calls = []

    def spiking(m, xb, yb):  # the third minibatch is 1e6 times its true loss
        calls.append(1)
        return _ce(m, xb, yb) * (1e6 if len(calls) == 3 else 1.0)

    seen: list[dict] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with bound_loss(LossBound(50.0, why="test bound")):
        with pytest.raises(TrainingDivergedError) as info:
            run_loop(model, opt, spiking, fetch, len(x), batch_size=10, num_steps=5, rng=None,
                     progress=lambda step, total, m: seen.append(clone_state(model.state_dict())),
                     context="test")  # fmt: skip
    err = info.value
    assert (err.step, err.total, err.bound) == (3, 5, 50.0) and err.loss > 50.0
    assert str(err) == (f"loss is {err.loss:.4g} at step 3/5 of test, above the divergence bound 50 "
                        "(test bound)")
    assert len(seen) == 2  # two steps reported; the third raised before its update
    for name, t in model.state_dict().items():
        assert torch.equal(t, seen[-1][name]), name


def test_under_a_bound_the_steps_nobody_read_are_checked_at_the_next_read():
    model, x, y, fetch = _problem()
    calls = []

    def spiking(m, xb, yb):  # only the second minibatch explodes; the loop reads the last one
        calls.append(1)
        return _ce(m, xb, yb) * (1e6 if len(calls) == 2 else 1.0)

    with bound_loss(LossBound(50.0)):
        with pytest.raises(TrainingDivergedError, match=r"^loss is \S+ in steps 1-4/5, above the divergence bound 50$"):
            run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-3), spiking, fetch, len(x),
                     batch_size=10, num_steps=5, rng=None)  # fmt: skip
    calls.clear()
    out = run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-3), spiking, fetch, len(x),
                   batch_size=10, num_steps=5, rng=None)  # fmt: skip
    assert math.isfinite(out.last_loss)  # unbounded, a finite spike between reads goes unseen


def test_without_a_bound_only_non_finite_losses_fail():
    model, x, y, fetch = _problem(scale=1e4)  # huge, finite losses
    assert active_loss_bound() is None
    out = run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), _ce, fetch, len(x), batch_size=10,
                   num_steps=4, rng=None, progress=lambda *a: None)  # fmt: skip
    assert out.last_loss > 50.0 and math.isfinite(out.last_loss)
    with bound_loss(LossBound(50.0)):
        with bound_loss(None):  # lifted for an inner block, restored after it
            run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), _ce, fetch, len(x),
                     batch_size=10, num_steps=1, rng=None)  # fmt: skip
        assert active_loss_bound() == LossBound(50.0)
        with pytest.raises(TrainingDivergedError, match=r"at step 1/1, above the divergence bound 50$"):
            run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), _ce, fetch, len(x),
                     batch_size=10, num_steps=1, rng=None)  # fmt: skip
    assert active_loss_bound() is None


def test_a_bound_applies_only_in_the_thread_that_set_it():
    model, x, y, fetch = _problem(scale=1e4)
    outcome: dict[str, object] = {}
    entered, release = threading.Event(), threading.Event()

    def bounded() -> None:
        with bound_loss(LossBound(50.0)):
            entered.set()
            release.wait(10)
            try:
                run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), _ce, fetch, len(x),
                         batch_size=10, num_steps=1, rng=None)  # fmt: skip
            except TrainingDivergedError as exc:
                outcome["error"] = exc

    t = threading.Thread(target=bounded)
    t.start()
    assert entered.wait(10)
    try:
        # Another thread (another round's worker) trains while the bound is held: unaffected.
        assert active_loss_bound() is None
        run_loop(model, torch.optim.SGD(model.parameters(), lr=1e-6), _ce, fetch, len(x), batch_size=10,
                 num_steps=1, rng=None)  # fmt: skip
    finally:
        release.set()
        t.join(10)
    assert isinstance(outcome.get("error"), TrainingDivergedError)


def test_every_trainer_on_the_loop_honours_the_bound(digits):
    """Plain Adam, DRESS's SGD stages and both DPU steps all run on the shared loop."""
    x = digits.x_train[:64].astype(np.float32) * 1e4  # out-of-range inputs: a huge loss at step 1
    y = digits.y_train[:64]
    spec = ArchSpec("mlp", tuple(digits.x_train.shape[1:]), 10, hidden=(16,))
    with bound_loss(LossBound(100.0)):
        with pytest.raises(TrainingDivergedError, match=r"step 1/\d+ of supervised training .*bound 100"):
            train_supervised(init_weights_from_seed(build_model(spec), 0), x, y, TrainConfig(epochs=1),
                             progress=lambda *a: None)  # fmt: skip

        class Sgd:
            batch_size, lr, momentum, weight_decay, seed = 16, 0.01, 0.9, 0.0, 0

        with pytest.raises(TrainingDivergedError, match=r"of SGD epochs, above the divergence bound 100"):
            sgd_epochs(init_weights_from_seed(build_model(spec), 0), cross_entropy, TensorData(x, y, "cpu"), 1,
                       Sgd())  # fmt: skip
        model = init_weights_from_seed(build_model(spec), 0)
        with pytest.raises(TrainingDivergedError, match=r"step 1/\d+ of phase 1 .*bound 100"):
            dpu.partial_update(model, clone_state(model.state_dict()), x, y, x[:16], y[:16],
                               dpu.DPUConfig(epochs=1), progress=lambda *a: None)  # fmt: skip


def test_a_bound_is_positive_and_finite():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive finite"):
            LossBound(bad)


@pytest.mark.parametrize("arch", [MLP, DRESS_MLP, ArchSpec("mlp", (4,), 2, hidden=(8,))])
def test_a_rounds_bound_is_the_factor_times_the_chance_level_loss(arch):
    # Cross-entropy and DRESS's subnet loss (weights summing to one) both start at ln C.
    chance = objective_for(arch).chance_loss(arch)
    assert chance == pytest.approx(math.log(arch.num_classes))
    model = init_weights_from_seed(build_model(arch), 0)
    x = torch.rand(256, *arch.input_shape)
    y = torch.randint(0, arch.num_classes, (256,))
    with torch.no_grad():
        if arch.extra:  # Eq. 3.4 over the subnets of the untrained weights
            untrained = float(dress_loss(model, x, y, arch.extra["dress"]["sparsities"]))
        else:
            untrained = float(F.cross_entropy(model(x), y))
    assert untrained == pytest.approx(chance, rel=0.5)  # what an untrained model starts at
    bound = loss_bound(arch, FullParams())
    assert bound is not None and bound.max_loss == pytest.approx(DEFAULT_MAX_LOSS_FACTOR * chance)
    assert "max_loss_factor=1000" in bound.why
    assert loss_bound(arch, DPUParams(max_loss_factor=20)).max_loss == pytest.approx(20 * chance)
    assert loss_bound(arch, FullParams(max_loss_factor=None)) is None


@pytest.mark.parametrize("factor", [1, 0.5, -3, 1e13, "lots"])
def test_max_loss_factor_is_validated(factor):
    with pytest.raises(ValidationError, match="max_loss_factor"):
        FullParams.model_validate({"max_loss_factor": factor})
