"""The learner seam end to end on real files and real models: a ModelStore, a ModelRunner, a
LocalDataset of real digits whose labels the device's users assign differently, and the
head learner. Tests wait on the service's outcome counter, never on the clock."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_agent.learner import LearnerService, split_holdout
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.personal_store import PersonalStore
from edge_agent.runner import ModelRunner, PersonalModelError
from edge_agent.settings import AgentSettings
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash
from shared.personal import Learner, PersonalDelta, register_learner
from shared.training import TrainConfig, train_supervised

PERM = np.roll(np.arange(10), 3)  # the device's world: same images, classes named differently
WAIT = 120  # seconds; a bound on a hang, not a timing assumption


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(digits, tiny_arch):
    """Two real fleet versions: the same MLP trained on digits from two seeds."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = init_weights_from_seed(build_model(tiny_arch), seed)
        train_supervised(model, digits.x_train, digits.y_train,
                         TrainConfig(epochs=8, lr=3e-3, seed=seed))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out.append((state, model_hash(tiny_arch, state)))
    return out


def _settings(tmp_path, **kw) -> AgentSettings:
    values = dict(data_dir=tmp_path, status_port=-1, learner="head", learner_min_samples=300,
                  learner_retrain_every=0, learner_epochs=20, learner_lr=1e-2,
                  learner_poll_s=0.05)
    values.update(kw)
    return AgentSettings(**values)


def _fill(local: LocalDataset, digits, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        local.add(digits.x_train[i], int(PERM[digits.y_train[i]]))


def _shifted_accuracy(runner: ModelRunner, digits, *, base: bool = False) -> float:
    pred, _ = runner.predict(digits.x_test, base=base)
    return float((pred == PERM[digits.y_test]).mean())


def _runner_on_installed(store: ModelStore) -> ModelRunner:
    """A fresh runner serving the store's current model, as the agent builds it at start-up."""
    runner = ModelRunner()
    installed = store.current()
    runner.load(installed.arch, installed.state, installed.model_hash)
    return runner


@pytest.fixture
def world(tmp_path, tiny_arch, bases):
    """Base v1 installed and loaded; an empty local dataset; stores on disk."""
    store = ModelStore(tmp_path)
    (v1, h1), _ = bases
    assert store.install(tiny_arch, v1, expected_hash=h1) == h1
    local = LocalDataset(tmp_path / "local.db")
    yield {"store": store, "runner": _runner_on_installed(store), "local": local,
           "personal": PersonalStore(tmp_path)}
    local.close()


def _derive_and_stop(settings: AgentSettings, world, digits) -> dict:
    """Derive (and store) a personal model for v1 from 350 local samples; the service's
    status once it stopped."""
    _fill(world["local"], digits, 350)
    svc = LearnerService(settings, world["runner"], world["personal"], world["local"])
    svc.start()
    assert svc.wait_outcomes(1, WAIT)
    svc.stop()
    return svc.status()


def test_personal_model_follows_the_base_through_an_update(tmp_path, world, digits, tiny_arch,
                                                          bases):
    (_, h1), (v2, h2) = bases
    runner, personal = world["runner"], world["personal"]
    # min_samples = all that will arrive, so the derivation sees exactly those 400.
    svc = LearnerService(_settings(tmp_path, learner_min_samples=400), runner, personal,
                         world["local"])
    svc.start()
    try:
        svc.base_changed()
        _fill(world["local"], digits, 400)  # the device's users label what they see
        svc.wake()
        assert svc.wait_outcomes(1, WAIT)
        st = svc.status()
        assert st["state"] == "serving", st
        assert st["base_hash"] == h1 and st["derivations"] == 1
        assert st["personal_accuracy"] >= st["base_accuracy"]
        assert st["train_samples"] + st["holdout_samples"] == 400
        # Served on top of v1: predictions change, the fleet version does not.
        assert runner.model_hash == h1 and runner.personal_hash == st["personal_hash"]
        assert runner.describe()["personal_hash"] == st["personal_hash"]
        p = runner.predict_timed(digits.x_test)
        assert p.model_hash == h1 and p.personal_hash == st["personal_hash"]
        assert _shifted_accuracy(runner, digits) > _shifted_accuracy(runner, digits, base=True)
        assert personal.entries() == [(h1, "head")]
        first_personal = st["personal_hash"]
        metrics = svc.metrics()
        assert metrics["learner_serving_personal"] == 1.0 and metrics["learner_derivations"] == 1
        assert all(isinstance(v, float) for v in metrics.values())
        json.dumps(st)  # /status serves it as JSON

        # The fleet ships v2: install it as the updater does, load it, commit.
        assert world["store"].install(tiny_arch, v2, expected_hash=h2) == h2
        runner.load(tiny_arch, world["store"].load(h2).state, h2)
        assert runner.personal_hash == "" and runner.describe()["personal_hash"] is None
        svc.base_changed()
        assert svc.wait_outcomes(2, WAIT)
        st = svc.status()
        assert st["state"] == "serving" and st["base_hash"] == h2 and st["derivations"] == 2
        assert runner.model_hash == h2 and runner.personal_hash == st["personal_hash"]
        assert st["personal_hash"] != first_personal
        assert _shifted_accuracy(runner, digits) > _shifted_accuracy(runner, digits, base=True)
        # Re-derived from the stored local data (nothing new arrived), v1's artefact is gone.
        assert world["local"].added == 400
        assert personal.entries() == [(h2, "head")]
        assert world["store"].has(h1)  # the fleet's own rollback copy is untouched
    finally:
        svc.stop()


def test_a_restart_serves_the_stored_personal_model(tmp_path, world, digits):
    settings = _settings(tmp_path)
    derived = _derive_and_stop(settings, world, digits)
    assert derived["state"] == "serving"

    runner = _runner_on_installed(world["store"])  # the agent restarts on the same files
    again = LearnerService(settings, runner, PersonalStore(tmp_path), world["local"])
    again.start()
    try:
        assert again.wait_outcomes(1, WAIT)
        st = again.status()
        assert st["loaded"] == 1 and st["derivations"] == 0, st
        assert runner.personal_hash == derived["personal_hash"]
        assert st["personal_accuracy"] == pytest.approx(derived["personal_accuracy"])
    finally:
        again.stop()


def test_a_corrupt_stored_personal_model_is_rederived(tmp_path, world, digits):
    settings = _settings(tmp_path)
    assert _derive_and_stop(settings, world, digits)["state"] == "serving"
    path = world["personal"].path(world["runner"].model_hash, "head")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))

    runner = _runner_on_installed(world["store"])
    store = PersonalStore(tmp_path)
    again = LearnerService(settings, runner, store, world["local"])
    again.start()
    try:
        assert again.wait_outcomes(1, WAIT)
        st = again.status()
        assert store.discarded == 1 and st["loaded"] == 0 and st["derivations"] == 1
        assert st["state"] == "serving" and runner.personal_hash == st["personal_hash"]
        assert store.load(runner.model_hash, "head").personal_hash == st["personal_hash"]
    finally:
        again.stop()


def test_new_local_samples_trigger_a_retrain(tmp_path, world, digits):
    svc = LearnerService(_settings(tmp_path, learner_retrain_every=100), world["runner"],
                         world["personal"], world["local"])
    _fill(world["local"], digits, 300)
    svc.start()
    try:
        assert svc.wait_outcomes(1, WAIT)
        first = svc.status()
        _fill(world["local"], digits, 99, start=300)
        svc.wake()
        _fill(world["local"], digits, 1, start=399)
        svc.wake()
        assert svc.wait_outcomes(2, WAIT)
        second = svc.status()
        assert second["derivations"] == 2
        assert second["train_samples"] + second["holdout_samples"] == 400
        assert second["personal_hash"] != first["personal_hash"]
    finally:
        svc.stop()


def test_too_few_samples_or_an_uncommitted_base_derive_nothing(tmp_path, world, digits,
                                                              tiny_arch, bases):
    """Driven step by step (no thread) so "nothing happened" is a fact, not a timeout."""
    (_, h1), (v2, h2) = bases
    runner = world["runner"]
    svc = LearnerService(_settings(tmp_path), runner, world["personal"], world["local"])
    svc.base_changed()
    _fill(world["local"], digits, 299)
    svc._step()
    assert svc.status()["state"] == "waiting_for_samples" and svc.outcomes == 0
    _fill(world["local"], digits, 1, start=299)
    runner.load(tiny_arch, v2, h2)  # on probation: the supervisor has not committed it
    svc._step()
    assert svc.status()["state"] == "waiting_for_commit" and svc.outcomes == 0
    assert runner.personal_hash == "" and world["personal"].entries() == []
    svc.base_changed()  # committed
    svc._step()
    assert svc.outcomes == 1 and svc.status()["base_hash"] == h2
    assert runner.personal_hash != ""


def test_a_rollback_serves_the_old_bases_personal_model_again(tmp_path, world, digits,
                                                              tiny_arch, bases):
    (v1, h1), (v2, h2) = bases
    runner = world["runner"]
    svc = LearnerService(_settings(tmp_path), runner, world["personal"], world["local"])
    svc.base_changed()
    _fill(world["local"], digits, 300)
    svc._step()
    served = runner.personal_hash
    assert served and svc.status()["derivations"] == 1
    runner.load(tiny_arch, v2, h2)  # probation of v2, then rolled back to v1
    runner.load(tiny_arch, v1, h1)
    svc.base_changed()
    svc._step()
    st = svc.status()
    assert runner.personal_hash == served and st["loaded"] == 1 and st["derivations"] == 1


@register_learner
class _ScrambleLearner(Learner):
    """A learner that makes things worse: its head ignores the data."""

    name = "test-scramble"

    def adapt(self, arch, base_state, x, y, config) -> PersonalDelta:
        g = torch.Generator().manual_seed(0)
        return PersonalDelta({k: torch.randn(v.shape, generator=g) * 5
                              for k, v in base_state.items() if k.startswith("net.3.")})


def test_a_personal_model_worse_than_the_base_is_not_served(tmp_path, world, digits):
    svc = LearnerService(_settings(tmp_path, learner="test-scramble"), world["runner"],
                         world["personal"], world["local"])
    for i in range(300):  # the fleet's own labels: the base is right here
        world["local"].add(digits.x_train[i], int(digits.y_train[i]))
    svc.base_changed()
    svc._step()
    st = svc.status()
    assert st["state"] == "base_better" and st["personal_accuracy"] < st["base_accuracy"]
    assert world["runner"].personal_hash == "" and world["personal"].entries() == []


def test_disabled_learner_does_nothing(tmp_path, world):
    svc = LearnerService(_settings(tmp_path, learner="none"), world["runner"], world["personal"],
                         world["local"])
    svc.start()
    svc.base_changed()
    svc.stop()
    assert svc.status() == {"learner": "none", "state": "disabled"} and svc.metrics() == {}


def test_unknown_learner_is_a_settings_error(tmp_path):
    with pytest.raises(ValueError, match="learner"):
        AgentSettings(data_dir=tmp_path, learner="nope")


def test_holdout_split_is_seeded_and_disjoint():
    train, hold = split_holdout(100, 0.2)
    assert len(hold) == 20 and len(train) == 80 and not set(train) & set(hold)
    assert np.array_equal(split_holdout(100, 0.2)[1], hold)
    assert len(split_holdout(2, 0.9)[0]) == 1


# --- the runner's side of the seam --------------------------------------------------------


def test_runner_serves_personal_only_on_its_base(tiny_arch, bases, digits):
    (v1, h1), (v2, h2) = bases
    runner = ModelRunner()
    runner.load(tiny_arch, v1, h1)
    personal = dict(v1)
    personal["net.3.bias"] = v1["net.3.bias"] + 100 * torch.eye(10)[4]  # always class 4
    assert runner.set_personal(h2, personal, "p" * 64) is False  # made for another base
    assert runner.personal_hash == ""
    assert runner.set_personal(h1, personal, "p" * 64) is True
    assert (runner.predict(digits.x_test)[0] == 4).all()
    assert not (runner.predict(digits.x_test, base=True)[0] == 4).all()
    assert runner.state is v1 and runner.model_hash == h1  # the base is what updates diff
    runner.load(tiny_arch, v2, h2)
    assert runner.personal_hash == "" and not (runner.predict(digits.x_test)[0] == 4).all()
    runner.set_personal(h2, personal, "q" * 64)
    runner.clear_personal(h1)  # stale: ignored
    assert runner.personal_hash == "q" * 64
    runner.clear_personal()
    assert runner.personal_hash == ""
    with pytest.raises(PersonalModelError):
        runner.set_personal(h2, {"net.3.bias": torch.zeros(10)}, "r" * 64)


def test_runner_refuses_a_personal_model_on_a_dress_base(bases):
    arch = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,),
                    extra={"dress": {"sparsities": [0.5, 0.9], "gamma": 0.5}})
    state = {k: v.detach().clone() for k, v in build_model(arch).state_dict().items()}
    runner = ModelRunner()
    runner.load(arch, state, model_hash(arch, state))
    with pytest.raises(PersonalModelError, match="plain"):
        runner.set_personal(runner.model_hash, state, "p" * 64)
