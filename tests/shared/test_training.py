"""Supervised training on real data: it learns, it is reproducible, and it keeps the best
validation weights rather than the last ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed
from shared.tensors import clone_state, tensors_hash
from shared.training import TrainConfig, accuracy, batches, predict_logits, train_supervised

ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64,))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(seed: int = 0):
    return init_weights_from_seed(build_model(ARCH), seed)


def test_training_on_digits_beats_chance_clearly(digits):
    model = _model()
    before = accuracy(model, digits.x_test, digits.y_test)
    stats = train_supervised(model, digits.x_train, digits.y_train, TrainConfig(epochs=4, batch_size=32, lr=3e-3),
                             x_val=digits.x_test, y_val=digits.y_test)
    after = accuracy(model, digits.x_test, digits.y_test)
    assert before < 0.3  # untrained: about chance (0.1)
    assert after > 0.85, after
    assert stats["val_accuracy"] == pytest.approx(after)  # the kept weights are the reported ones
    assert 0 < stats["train_loss"] < 1.0


def test_training_is_reproducible_for_a_seed(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    cfg = TrainConfig(epochs=2, batch_size=16, seed=4)
    a, b = _model(), _model()
    train_supervised(a, x, y, cfg)
    train_supervised(b, x, y, cfg)
    assert tensors_hash(a.state_dict()) == tensors_hash(b.state_dict())
    c = _model()
    train_supervised(c, x, y, TrainConfig(epochs=2, batch_size=16, seed=5))  # other batch order
    assert tensors_hash(c.state_dict()) != tensors_hash(a.state_dict())


def test_keeps_best_validation_weights_not_the_last(digits):
    """Record each epoch's validation accuracy (reported in the progress metrics at epoch ends)
    and weights. During the last epoch a forward hook makes the model predict a constant in
    eval mode (as a wrecked model would), so that epoch scores about chance. The model must
    come back with the best epoch's weights (the later one on a tie), not the last ones, and
    report that epoch's accuracy."""
    x, y = digits.x_train, digits.y_train
    xv, yv = digits.x_test, digits.y_test
    cfg = TrainConfig(epochs=4, batch_size=64, lr=2e-3)
    steps_per_epoch = len(batches(len(x), cfg.batch_size, None))
    model = _model()
    wrecked = [False]
    seen: list[tuple[float, dict[str, torch.Tensor]]] = []

    def constant_when_wrecked(module, args, out):
        return torch.zeros_like(out) if wrecked[0] and not module.training else out

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        assert np.isfinite(metrics["loss"])
        if step % steps_per_epoch == 0:
            seen.append((metrics["val_accuracy"], clone_state(model.state_dict())))
            wrecked[0] = step == total - steps_per_epoch  # the last epoch is validated wrecked
        else:
            assert "val_accuracy" not in metrics

    hook = model.register_forward_hook(constant_when_wrecked)
    stats = train_supervised(model, x, y, cfg, x_val=xv, y_val=yv, progress=progress)
    hook.remove()
    assert len(seen) == cfg.epochs
    accs = [a for a, _ in seen]
    assert accs[-1] < 0.2 and max(accs) > 0.5
    best = max(i for i, a in enumerate(accs) if a == max(accs))  # ties prefer the later epoch
    assert stats["val_accuracy"] == pytest.approx(accs[best])
    assert tensors_hash(model.state_dict()) == tensors_hash(seen[best][1])
    assert tensors_hash(model.state_dict()) != tensors_hash(seen[-1][1])
    assert accuracy(model, xv, yv) == pytest.approx(accs[best])


def test_without_validation_the_last_weights_are_kept(digits):
    model = _model()
    last = {}

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step == total:
            last.update(clone_state(model.state_dict()))

    stats = train_supervised(model, digits.x_train[:200], digits.y_train[:200], TrainConfig(epochs=2),
                             progress=progress)
    assert stats["val_accuracy"] == -1
    assert tensors_hash(model.state_dict()) == tensors_hash(last)


def test_float_inputs_train_too():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = init_weights_from_seed(build_model(ArchSpec("mlp", (6,), 2, hidden=(16,))), 0)
    train_supervised(model, x, y, TrainConfig(epochs=10, batch_size=32, lr=1e-2))
    assert accuracy(model, x, y) > 0.9


def test_batches_cover_every_index_once():
    rng = np.random.Generator(np.random.PCG64(0))
    got = np.concatenate(batches(103, 10, rng))
    assert len(got) == 103 and sorted(got.tolist()) == list(range(103))
    assert [len(b) for b in batches(25, 10, None)] == [10, 10, 5]
    assert [len(b) for b in batches(21, 10, None)] == [10, 11]  # a one-sample tail joins in


def test_trailing_single_sample_with_batchnorm_trains(fashion_mnist):
    """The issue's reproduction: 65 Fashion-MNIST images in batches of 64 left a last batch of
    one, and the CNN's BatchNorm1d refused it. Now the tail joins the previous batch."""
    ds = fashion_mnist
    x, y = ds.x_train[:65], ds.y_train[:65]
    model = init_weights_from_seed(build_model(default_spec("cnn", (1, 28, 28), 10)), 0)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    steps: list[int] = []
    stats = train_supervised(model, x, y, TrainConfig(epochs=2, batch_size=64),
                             x_val=ds.x_test[:50], y_val=ds.y_test[:50],
                             progress=lambda step, total, m: steps.append(total))
    hook.remove()
    train_sizes = [s for s in sizes if s == 65]  # validation passes see 50 images
    assert train_sizes == [65, 65] and steps == [2, 2]
    assert np.isfinite(stats["train_loss"]) and 0 <= stats["val_accuracy"] <= 1


def test_predict_logits_keeps_the_training_mode_and_handles_empty_input(digits):
    model = _model().train()
    out = predict_logits(model, digits.x_test[:5])
    assert out.shape == (5, 10) and model.training
    assert predict_logits(model, digits.x_test[:0]).numel() == 0
    assert accuracy(model, digits.x_test[:0], digits.y_test[:0]) == 0.0


@pytest.mark.parametrize(
    "kwargs", [dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(lr=-1.0), dict(weight_decay=-0.1)]
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError, match="invalid training config"):
        TrainConfig(**kwargs)


def test_empty_training_set_is_refused():
    with pytest.raises(ValueError, match="empty"):
        train_supervised(_model(), np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), TrainConfig())
