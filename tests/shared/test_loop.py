"""The one training loop (shared/loop.py) and every trainer built on it: the tail rule, a
trailing one-sample batch with BatchNorm for each trainer, best-checkpoint keeping, progress,
hooks, divergence, and that the wrappers reproduce the loops they replaced bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shared.dpu as dpu
from shared.dress import DressConfig, prune_with_rewinding
from shared.dress.loops import TensorData, cross_entropy, recalibrate_norms, sgd_epochs
from shared.dress.train import train_dress
from shared.loop import (
    Hooks,
    TrainingDivergedError,
    Validation,
    epoch_batches,
    run_loop,
    snapshot,
    steps_per_epoch,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.tensors import clone_state, tensors_hash, to_model_input
from shared.training import TrainConfig, train_supervised

# A CNN small enough for two shared cores, with BatchNorm2d in the features and BatchNorm1d in
# the head (the layer that refused a one-sample batch).
CNN = ArchSpec("cnn", (1, 8, 8), 10, hidden=(16,), channels=(4, 8))
DRESS_CNN = ArchSpec("cnn", (1, 8, 8), 10, hidden=(16,), channels=(4, 8),
                     extra={"dress": {"sparsities": [0.5, 0.8]}})  # fmt: skip
MLP = ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(spec: ArchSpec = CNN, seed: int = 0) -> nn.Module:
    return init_weights_from_seed(build_model(spec), seed)


class _Sgd:  # OptimSettings for sgd_epochs / the pruning baseline
    batch_size, lr, momentum, weight_decay, seed = 64, 0.05, 0.9, 5e-4, 0


# --- the tail rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, batch_size, sizes",
    [
        (1, 64, [1]),
        (2, 64, [2]),
        (64, 64, [64]),
        (65, 64, [65]),  # the case: the single tail joins the batch before it
        (66, 64, [64, 2]),
        (129, 64, [64, 65]),
        (130, 64, [64, 64, 2]),
        (3, 1, [1, 1, 1]),  # batch_size=1 is every batch a single sample, by request
        (5, 2, [2, 3]),
    ],
)
def test_tail_rule_batch_sizes(n, batch_size, sizes):
    got = epoch_batches(n, batch_size, np.random.Generator(np.random.PCG64(n)))
    assert [len(b) for b in got] == sizes
    assert sorted(np.concatenate(got).tolist()) == list(range(n))
    assert steps_per_epoch(n, batch_size) == len(sizes)


def test_steps_per_epoch_matches_the_batches_everywhere():
    for n in range(1, 140):
        for bs in (1, 2, 3, 16, 64):
            assert steps_per_epoch(n, bs) == len(epoch_batches(n, bs, None)), (n, bs)
    assert dpu.DPUConfig(epochs=3, batch_size=64).num_steps(129) == 3 * 2
    assert steps_per_epoch(0, 8) == 0
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(5, 0)


def test_shuffling_is_seeded():
    a = epoch_batches(50, 8, np.random.Generator(np.random.PCG64(3)))
    b = epoch_batches(50, 8, np.random.Generator(np.random.PCG64(3)))
    c = epoch_batches(50, 8, np.random.Generator(np.random.PCG64(4)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


# --- a trailing batch of one sample, with BatchNorm, for every trainer ----------------------


def _supervised(model, x, y, xv, yv):
    return train_supervised(model, x, y, TrainConfig(epochs=2, batch_size=64), x_val=xv, y_val=yv)


def _sgd(model, x, y, xv, yv):
    return sgd_epochs(model, cross_entropy, TensorData(x, y, "cpu"), 2, _Sgd)


def _dress(model, x, y, xv, yv):
    config = DressConfig(sparsities=(0.5, 0.8), pretrain_epochs=1, epochs=1, norm_epochs=1,
                         batch_size=64)  # fmt: skip
    result = train_dress(model, x, y, xv, yv, config)
    assert result.norm_states is not None and len(result.val_accuracy) == 2
    return result


def _dpu(model, x, y, xv, yv):
    config = dpu.DPUConfig(k=0.1, epochs=2, batch_size=64, optimizer="sgd", lr=0.05)
    result = dpu.partial_update(model, clone_state(model.state_dict()), x, y, xv, yv, config)
    model.load_state_dict(result.candidate_state)
    return result


def _pruning(model, x, y, xv, yv):
    state, _ = prune_with_rewinding(model, x, y, xv, yv, 0.8, _Sgd, schedule=(0.5, 1.0))
    return state


TRAINERS = {"supervised": _supervised, "sgd_epochs": _sgd, "dress": _dress, "dpu": _dpu,
            "pruning": _pruning}  # fmt: skip


def _batch_sizes_seen(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Batch sizes of the training-mode forward passes through the head's BatchNorm1d."""
    sizes: list[int] = []
    bn = model.classifier[2]
    assert isinstance(bn, nn.BatchNorm1d)

    def hook(module, args):
        if module.training:
            sizes.append(len(args[0]))

    return sizes, bn.register_forward_pre_hook(hook)


@pytest.mark.parametrize("spec", [CNN, DRESS_CNN], ids=["plain", "dress"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_trailing_single_sample_joins_the_last_batch(digits, trainer, spec):
    """65 samples in batches of 64: the last batch would hold one sample, which BatchNorm1d
    refuses in training mode ("Expected more than 1 value per channel")."""
    model = _model(spec)
    before = clone_state(model.state_dict())
    sizes, handle = _batch_sizes_seen(model)
    TRAINERS[trainer](model, digits.x_train[:65], digits.y_train[:65],
                      digits.x_test[:40], digits.y_test[:40])  # fmt: skip
    handle.remove()
    assert sizes and set(sizes) == {65}, sizes  # never a batch of 1 (or of 64 + 1)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("classifier") for k in moved)


@pytest.mark.parametrize("spec", [CNN, DRESS_CNN], ids=["plain", "dress"])
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_single_training_sample_trains_with_running_statistics(digits, trainer, spec):
    """With one training sample there is no batch to join: the step runs BatchNorm in eval
    mode (running statistics), weights still train and the model ends in training mode."""
    model = _model(spec)
    before = clone_state(model.state_dict())
    TRAINERS[trainer](model, digits.x_train[:1], digits.y_train[:1],
                      digits.x_test[:10], digits.y_test[:10])  # fmt: skip
    state = model.state_dict()
    weights = [k for k, _ in model.named_parameters() if k.endswith("weight")]
    assert any(not torch.equal(state[k], before[k]) for k in weights)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_one_sample_step_uses_and_keeps_running_statistics(digits):
    model = _model().train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = to_model_input(digits.x_train[:1])
    out = run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy,
                   lambda idx: (x[idx], torch.tensor([3])), 1, batch_size=8, num_steps=3,
                   rng=None)  # fmt: skip
    assert out.steps == 3 and math.isfinite(out.last_loss)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.training and all(m.training for m in model.modules())


def test_recalibrating_norms_on_one_sample_keeps_the_statistics(digits):
    model = _model()
    with torch.no_grad():
        model.classifier[2].running_mean.fill_(0.5)
    recalibrate_norms(model, TensorData(digits.x_train[:1], digits.y_train[:1], "cpu"))
    assert torch.all(model.classifier[2].running_mean == 0.5)
    recalibrate_norms(model, TensorData(digits.x_train[:257], digits.y_train[:257], "cpu"))
    assert not torch.all(model.classifier[2].running_mean == 0.5)  # 256 + 1: one batch of 257


# --- the loop's contract --------------------------------------------------------------------


def _linear_problem(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(5, 2)
    torch.nn.init.zeros_(model.weight)
    return model, x, y, lambda idx: (x[idx], y[idx])


def _ce(model, xb, yb):
    return F.cross_entropy(model(xb), yb)


def test_best_checkpoint_ties_prefer_the_later_one():
    model, x, y, fetch = _linear_problem()
    scripted = iter([0.5, 0.7, 0.7, 0.2])
    states: list[dict[str, torch.Tensor]] = []
    out = run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), _ce, fetch, len(x),
                   batch_size=10, num_steps=8, rng=None,
                   validation=Validation(lambda m: next(scripted), every=2),
                   hooks=Hooks(after_step=lambda s: states.append(snapshot(model))))  # fmt: skip
    assert out.best_metric == 0.7
    assert tensors_hash(out.best_state) == tensors_hash(states[5])  # the 3rd check, after step 6
    assert tensors_hash(out.best_state) != tensors_hash(states[3])
    assert tensors_hash(model.state_dict()) == tensors_hash(states[7])  # the loop leaves the last


def test_validation_runs_per_epoch_by_default_and_after_the_last_step():
    model, x, y, fetch = _linear_problem(40)
    calls: list[int] = []
    counter = {"step": 0}
    run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), _ce, fetch, len(x),
             batch_size=15, num_steps=7, rng=None,  # 40 -> batches of 15, 15, 10: 3 per epoch
             validation=Validation(lambda m: calls.append(counter["step"]) or 0.0),
             hooks=Hooks(after_step=lambda s: counter.update(step=s + 1)))  # fmt: skip
    assert calls == [3, 6, 7]


def test_progress_counts_steps_with_offset_total_and_validation_metrics(digits):
    model, x, y, fetch = _linear_problem(40)
    seen: list[tuple[int, int, dict[str, float]]] = []
    run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), _ce, fetch, len(x),
             batch_size=10, num_steps=6, rng=np.random.Generator(np.random.PCG64(0)),
             validation=Validation(lambda m: 0.5, every=3), progress=lambda *a: seen.append(a),
             progress_offset=10, progress_total=30, progress_extra={"phase": 2.0})  # fmt: skip
    assert [(s, t) for s, t, _ in seen] == [(11 + i, 30) for i in range(6)]
    assert all(m["phase"] == 2.0 and math.isfinite(m["loss"]) for _, _, m in seen)
    assert [("val_accuracy" in m) for _, _, m in seen] == [False, False, True] * 2

    # Every trainer reports once per optimizer step, ending at its total.
    steps: list[tuple[int, int]] = []
    train_supervised(_model(MLP), digits.x_train[:97], digits.y_train[:97],
                     TrainConfig(epochs=3, batch_size=32),
                     progress=lambda s, t, m: steps.append((s, t)))  # fmt: skip
    assert steps == [(i + 1, 9) for i in range(9)]  # 97 = 32 + 32 + 33: 3 steps per epoch
    steps.clear()
    sgd_epochs(_model(MLP), cross_entropy, TensorData(digits.x_train[:65], digits.y_train[:65], "cpu"),
               2, _Sgd, progress=lambda s, t, m: steps.append((s, t)))  # fmt: skip
    assert steps == [(1, 2), (2, 2)]
    steps.clear()
    model = _model(MLP)
    dpu.partial_update(model, clone_state(model.state_dict()), digits.x_train[:65],
                       digits.y_train[:65], digits.x_test[:30], digits.y_test[:30],
                       dpu.DPUConfig(k=0.1, epochs=2, batch_size=32),
                       progress=lambda s, t, m: steps.append((s, t)))  # fmt: skip
    assert steps == [(i + 1, 8) for i in range(8)]  # 65 = 32 + 33: 2 per epoch, 2 epochs, 2 steps


def test_hooks_see_gradients_and_the_parameter_change_and_epochs_end():
    model, x, y, fetch = _linear_problem(40)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record: dict[str, list] = {"grad": [], "delta": [], "lr": [], "epochs": []}
    before: dict[str, torch.Tensor] = {}

    def before_step(step):
        record["grad"].append(model.weight.grad.clone())
        record["lr"].append(opt.param_groups[0]["lr"])
        before["w"] = model.weight.detach().clone()

    def after_step(step):
        record["delta"].append(model.weight.detach() - before["w"])

    def end_of_epoch(epoch):
        record["epochs"].append(epoch)
        model.eval()  # the loop must put the model back into training mode

    run_loop(model, opt, _ce, fetch, len(x), batch_size=20, num_steps=5, rng=None,
             lr_at=lambda s: 0.1 / (s + 1),
             hooks=Hooks(before_step=before_step, after_step=after_step, end_of_epoch=end_of_epoch))
    assert record["lr"] == [0.1 / (s + 1) for s in range(5)]
    for g, d, lr in zip(record["grad"], record["delta"], record["lr"], strict=True):
        torch.testing.assert_close(d, -lr * g)  # plain SGD: the change is -lr * gradient
    assert record["epochs"] == [0, 1] and model.training  # 5 steps = 2 full epochs + 1 step


class _CountingLoss(torch.Tensor):
    reads = 0

    def __float__(self):
        _CountingLoss.reads += 1
        return super().__float__()


def test_the_loss_is_read_from_the_device_only_when_needed():
    model, x, y, fetch = _linear_problem(40)

    def loss_fn(m, xb, yb):
        return _ce(m, xb, yb).as_subclass(_CountingLoss)

    def reads(**kw) -> int:
        _CountingLoss.reads = 0
        run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, fetch, len(x),
                 batch_size=10, num_steps=8, rng=None, **kw)  # fmt: skip
        return _CountingLoss.reads

    assert reads() == 1  # the last step only
    assert reads(validation=Validation(lambda m: 0.0, every=4)) == 2  # steps 4 and 8
    assert reads(progress=lambda *a: None) == 8


def test_a_non_finite_loss_raises_a_typed_error_naming_the_step():
    model, x, y, fetch = _linear_problem(40)

    calls = []

    def exploding(m, xb, yb):
        calls.append(1)
        loss = _ce(m, xb, yb)
        return loss * math.inf if len(calls) == 3 else loss

    with pytest.raises(TrainingDivergedError, match=r"loss is inf at step 3/5 of test") as info:
        run_loop(model, torch.optim.SGD(model.parameters(), lr=0.1), exploding, fetch, len(x),
                 batch_size=10, num_steps=5, rng=None, progress=lambda *a: None, context="test")
    assert (info.value.step, info.value.total, info.value.loss) == (3, 5, math.inf)


def test_trainers_raise_the_same_divergence_error(digits):
    assert dpu.TrainingDivergedError is TrainingDivergedError
    x = np.full((20, 6), np.nan, dtype=np.float32)
    y = np.zeros(20, dtype=np.int64)
    with pytest.raises(TrainingDivergedError, match="step 1/"):
        train_supervised(_model(ArchSpec("mlp", (6,), 2, hidden=(4,))), x, y, TrainConfig(epochs=1),
                         progress=lambda *a: None)  # fmt: skip
    model = _model(MLP)
    with pytest.raises(TrainingDivergedError, match=r"of phase 1 \(lr=1e\+30, optimizer=sgd\)"):
        dpu.partial_update(model, clone_state(model.state_dict()), digits.x_train[:64],
                           digits.y_train[:64], digits.x_test[:20], digits.y_test[:20],
                           dpu.DPUConfig(epochs=2, optimizer="sgd", lr=1e30, momentum=0.0),
                           progress=lambda *a: None)  # fmt: skip


def test_a_validation_metric_that_is_never_a_number_fails_the_dpu_round(digits):
    model = _model(MLP)
    with pytest.raises(TrainingDivergedError, match="NaN at every check"):
        dpu.partial_update(model, clone_state(model.state_dict()), digits.x_train[:64],
                           digits.y_train[:64], digits.x_test[:20], digits.y_test[:20],
                           dpu.DPUConfig(method="full", epochs=1),
                           metric_fn=lambda m, x, y: math.nan)  # fmt: skip


def test_empty_data_and_negative_steps_are_refused():
    model, x, y, fetch = _linear_problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        run_loop(model, opt, _ce, fetch, 0, batch_size=4, num_steps=1, rng=None)
    with pytest.raises(ValueError, match="num_steps"):
        run_loop(model, opt, _ce, fetch, 4, batch_size=4, num_steps=-1, rng=None)
    with pytest.raises(ValueError, match="every"):
        Validation(lambda m: 0.0, every=0)


# --- the wrappers reproduce the loops they replaced ----------------------------------------


def test_sgd_epochs_equals_sgd_with_torch_cosine_schedule(digits):
    """The old sgd_epochs: Nesterov SGD, LambdaLR cosine stepped after every step, shuffled
    epochs. With no one-sample tail the new one must give bit-identical weights."""
    x, y = digits.x_train[:150], digits.y_train[:150]  # 150 = 64 + 64 + 22
    new = _model()
    loss = sgd_epochs(new, cross_entropy, TensorData(x, y, "cpu"), 2, _Sgd, seed_offset=5)
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=_Sgd.lr, momentum=_Sgd.momentum, nesterov=True,
                          weight_decay=_Sgd.weight_decay)  # fmt: skip
    steps = 2 * math.ceil(len(x) / _Sgd.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    rng = np.random.Generator(np.random.PCG64(_Sgd.seed + 5))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(2):
        ref.train()
        order = rng.permutation(len(x))
        total = 0.0
        for i in range(0, len(x), _Sgd.batch_size):
            idx = torch.as_tensor(order[i : i + _Sgd.batch_size])
            opt.zero_grad(set_to_none=True)
            batch_loss = F.cross_entropy(ref(to_model_input(xt[idx])), yt[idx])
            batch_loss.backward()
            opt.step()
            sched.step()
            total += float(batch_loss.detach()) * len(idx)
    assert tensors_hash(new.state_dict()) == tensors_hash(ref.state_dict())
    assert loss == pytest.approx(total / len(x), rel=1e-5)


def test_dpu_full_phase_equals_the_alg_5_2_reference_loop(digits):
    """DPU's step schedule (alpha^q with milestones, Adam, shuffled epochs with the tail rule,
    best checkpoint every eval_every steps, ties to the later) written out by hand."""
    x, y = torch.as_tensor(digits.x_train[:97]), torch.as_tensor(digits.y_train[:97])
    xv, yv = torch.as_tensor(digits.x_test[:60]), torch.as_tensor(digits.y_test[:60])
    config = dpu.DPUConfig(method="full", epochs=3, batch_size=32, lr=3e-3,
                           lr_milestones=(0.5,), eval_every=4)  # fmt: skip
    new = _model(MLP)
    names = tuple(n for n, p in new.named_parameters() if p.dim() > 1)
    partial = {n: p for n, p in new.named_parameters() if n in names}
    out = dpu.train_phase(new, x, y, config, loss_fn=dpu.cross_entropy_loss, partial=partial,
                          validation=(xv, yv, dpu.top1_accuracy), batch_seed=11)  # fmt: skip

    ref = _model(MLP)
    opt = torch.optim.Adam(ref.parameters(), lr=config.lr)
    q_total = 3 * 3  # 97 = 32 + 32 + 33 under the tail rule
    rng = np.random.Generator(np.random.PCG64(11))
    order: list[np.ndarray] = []
    best, best_state = -math.inf, None
    ref.train()
    for q in range(q_total):
        if not order:
            perm = rng.permutation(97)
            order = [perm[:32], perm[32:64], perm[64:]]
        idx = torch.from_numpy(order.pop(0))
        for group in opt.param_groups:
            group["lr"] = config.lr * (0.1 if q >= round(0.5 * q_total) else 1.0)
        opt.zero_grad(set_to_none=True)
        dpu.cross_entropy_loss(ref, x[idx], y[idx]).backward()
        opt.step()
        if (q + 1) % 4 == 0 or q + 1 == q_total:
            value = dpu.top1_accuracy(ref, xv, yv)
            if value >= best:
                best, best_state = value, clone_state(ref.state_dict())
            ref.train()
    assert out.steps == q_total and out.best_metric == best
    assert tensors_hash(out.best_state) == tensors_hash(best_state)
    assert tensors_hash(new.state_dict()) == tensors_hash(ref.state_dict())
