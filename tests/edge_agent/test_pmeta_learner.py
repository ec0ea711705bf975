"""The pmeta learner on real files and real models: a p-Meta model meta-trained on digits 0-4,
a support set of digits 7, 8, 9 (classes it never saw) as PNG files in the watched folder and
samples posted to the local endpoint, the governor's memory budget, a base update, and a whole
agent against a real gRPC server that shows its personal model in heartbeats and never uploads
a support sample. Tests wait on the service's outcome counter or on conditions, not the clock."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select

from edge_agent.budget_sources import Budget
from edge_agent.few_shot import SupportSet, SupportSetError, learner_overrides
from edge_agent.learner import LearnerService
from edge_agent.personal_store import PersonalStore
from edge_agent.runner import ModelRunner
from edge_agent.settings import AgentSettings
from shared.data.tasks import TaskSampler
from shared.models import build_model, init_weights_from_seed, model_hash
from shared.pmeta import MetaTrainConfig, meta_train, pmeta_spec
from shared.samples import encode_sample, sample_id

ARCH = pmeta_spec((1, 8, 8), 5, channels=8, blocks=3, init_alpha=0.1)  # tiny model, few meta steps
NEW = (7, 8, 9)  # the device's classes: not among the meta-training classes 0-4
SHOTS = 5
WAIT = 120  # seconds; a bound on a hang, not a timing assumption

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(digits):
    """Two fleet versions: meta-trained on 5-way tasks of digits 0-4 from two seeds."""
    keep = digits.y_train < 5
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            model = init_weights_from_seed(build_model(ARCH), seed)
            sampler = TaskSampler(digits.x_train[keep], digits.y_train[keep], ways=5, shots=SHOTS, queries=5,
                                  seed=seed)
            meta_train(model, sampler, MetaTrainConfig(method="pmeta_att", ways=5, shots=SHOTS, queries=5,
                                                       meta_batch=2, iterations=15, seed=seed))
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            out.append((state, model_hash(ARCH, state)))
    finally:
        torch.set_num_threads(threads)
    return out


def _write_support(root, digits, shots: int = SHOTS) -> dict[str, np.ndarray]:
    """PNG files ``root/digit-<c>/<i>.png`` of the first ``shots`` train digits of each NEW class."""
    from PIL import Image

    written = {}
    for c in NEW:
        folder = root / f"digit-{c}"
        folder.mkdir(parents=True, exist_ok=True)
        xs = digits.x_train[digits.y_train == c][:shots]
        for i, x in enumerate(xs):
            Image.fromarray(x[0]).save(folder / f"{i}.png")
        written[f"digit-{c}"] = xs
    return written


class _Budget:
    """The governor's side of ``learner_overrides``: a memory budget in force."""

    def __init__(self, memory_mb: float | None) -> None:
        self.memory_mb = memory_mb

    def current_budget(self) -> Budget:
        return Budget(memory_mb=self.memory_mb)


@pytest.fixture
def world(tmp_path, bases):
    (v1, h1), _ = bases
    runner = ModelRunner()
    runner.load(ARCH, v1, h1)
    support = SupportSet(tmp_path / "few-shot", lambda: runner.arch.input_shape if runner.arch else None)
    return {"runner": runner, "support": support, "store": PersonalStore(tmp_path / "models"),
            "settings": AgentSettings(data_dir=tmp_path, status_port=-1, learner="pmeta", learner_poll_s=0.05,
                                      learner_holdout=0.2)}


def _service(world, memory_mb: float | None = None) -> tuple[LearnerService, _Budget]:
    budget = _Budget(memory_mb)
    svc = LearnerService(world["settings"], world["runner"], world["store"], world["support"],
                         config_overrides=learner_overrides(world["support"], budget), min_samples=4,
                         compare_base=False)
    return svc, budget


def test_the_learner_adapts_from_a_support_folder_and_serves_the_new_classes(world, digits, bases):
    _write_support(world["support"].root, digits)
    svc, _ = _service(world)
    svc.start()
    try:
        assert svc.wait_outcomes(1, WAIT)
        status, metrics = svc.status(), svc.metrics()
    finally:
        svc.stop()
    assert status["state"] == "serving", status
    assert json.loads(status["config"]["classes"]) == ["digit-7", "digit-8", "digit-9"]
    assert status["meta"]["classes"] == ["digit-7", "digit-8", "digit-9"]
    assert status["train_samples"] + status["holdout_samples"] == 3 * SHOTS
    assert metrics["learner_serving_personal"] == 1.0 and metrics["learner_saved_bytes"] > 0
    assert metrics["learner_seconds"] > 0 and 0 <= metrics["learner_personal_accuracy"] <= 1
    runner = world["runner"]
    assert runner.personal_hash and runner.model_hash == bases[0][1]  # the fleet version is unchanged
    # The personal model answers in the support set's label space: 0..2 = digit-7..digit-9.
    test = np.isin(digits.y_test, NEW)
    pred, _ = runner.predict(digits.x_test[test])
    assert set(np.unique(pred)) <= {0, 1, 2}
    truth = np.searchsorted(NEW, digits.y_test[test])
    # Chance is 1/3; 0.42 is two standard errors above it on these 107 test digits.
    assert (pred == truth).mean() > 0.42, (pred == truth).mean()
    assert runner.predict(digits.x_test[:4], base=True)[0].max() < 5  # the base keeps its 5 outputs


def test_nothing_fits_the_memory_budget_so_the_learner_refuses(world, digits):
    _write_support(world["support"].root, digits)
    svc, _ = _service(world, memory_mb=1e-6)
    svc.start()
    try:
        assert svc.wait_outcomes(1, WAIT)
        status = svc.status()
    finally:
        svc.stop()
    assert status["state"] == "refused" and status["reason"], status
    assert world["runner"].personal_hash == ""


def test_a_base_update_and_a_new_support_sample_re_adapt(world, digits, bases):
    _write_support(world["support"].root, digits)
    svc, _ = _service(world)
    svc.start()
    try:
        assert svc.wait_outcomes(1, WAIT)
        first = world["runner"].personal_hash
        (v2, h2) = bases[1]
        world["runner"].load(ARCH, v2, h2)  # the update machine installs the new fleet version
        svc.base_changed(h2)
        assert svc.wait_outcomes(2, WAIT)
        second = world["runner"].personal_hash
        assert svc.status()["state"] == "serving" and svc.status()["base_hash"] == h2
        assert second and second != first
        # One more labelled sample through the local endpoint's handler changes the support set.
        extra = digits.x_train[digits.y_train == 8][SHOTS]
        answer = world["support"].on_post({"class": "digit-8", "input": extra.tolist()})
        assert answer["shots"] == [SHOTS, SHOTS + 1, SHOTS]
        svc.wake()
        assert svc.wait_outcomes(3, WAIT)
        assert world["runner"].personal_hash not in ("", second)
        assert svc.status()["train_samples"] + svc.status()["holdout_samples"] == 3 * SHOTS + 1
    finally:
        svc.stop()


def test_the_support_endpoint_refuses_bad_samples(world):
    support = world["support"]
    with pytest.raises(SupportSetError, match="class"):
        support.on_post({"class": "../etc", "input": [[0] * 8] * 8})
    with pytest.raises(SupportSetError, match="fit"):
        support.on_post({"class": "mug", "input": [[0] * 5] * 5})
    with pytest.raises(SupportSetError, match="255"):
        support.on_post({"class": "mug", "input": [[300] * 8] * 8})
    with pytest.raises(SupportSetError, match="unknown keys"):
        support.on_post({"class": "mug", "input": [[0] * 8] * 8, "upload": True})
    assert len(support) == 0


# --- the whole agent against a real gRPC server ------------------------------------------------

@pytest.fixture
def server_settings(tmp_path):
    from server.settings import ServerSettings

    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'server.db'}",
                          model_arch_json=ARCH.to_json(), heartbeat_interval_s=0.2, watch_keepalive_s=0.2,
                          fsync=False)


def test_a_live_agent_shows_its_personal_model_and_never_uploads_the_support_set(
        tmp_path, server, server_ctx, digits, wait_until):
    from edge_agent.daemon import Agent
    from edge_agent.sources import DatasetShardSource
    from server.db.engine import transaction
    from server.db.models import Device, Sample

    support = _write_support(tmp_path / "agent" / "few-shot", digits)
    # The stream is the fleet's world (digits 0-4), uploaded in full; the support set is not.
    stream = digits.y_train < 5
    source = DatasetShardSource(digits.x_train[stream][:200], digits.y_train[stream][:200], rate_per_s=400.0,
                                seed=0)
    settings = AgentSettings(server=server.address, data_dir=tmp_path / "agent", status_port=0, battery=False,
                             insecure=True, load_budget=False, heartbeat_interval_s=0.2, backoff_initial_s=0.05,
                             backoff_max_s=0.5, upload_mode="all", learner="pmeta", learner_poll_s=0.05,
                             enrollment_token=server.enrollment_token, probation_margin=1.0)
    agent = Agent(settings, source=source)
    agent.start()
    try:
        wait_until(lambda: agent.status()["learner"]["state"] == "serving", 60, "the personal model")
        wait_until(lambda: source.exhausted and len(agent.queue) == 0, 60, "the stream uploaded")

        def heartbeat_shows_it() -> bool:
            with transaction(server_ctx.factory) as s:
                m = s.scalars(select(Device)).one().metrics or {}
            return m.get("learner_serving_personal") == 1.0 and m.get("learner_saved_bytes", 0) > 0

        wait_until(heartbeat_shows_it, 30, "a heartbeat with the personal model")
        # POST /few-shot on the live status endpoint adds a sample (and it stays local too).
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", agent.status_server.port, timeout=10)
        posted = digits.x_train[digits.y_train == 9][SHOTS]
        conn.request("POST", "/few-shot", body=json.dumps({"class": "digit-9", "input": posted.tolist()}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        conn.close()
        view = agent.status()
        assert view["few_shot"]["classes"] == ["digit-7", "digit-8", "digit-9"]
        assert view["runner"]["personal_hash"] == view["learner"]["personal_hash"]
    finally:
        agent.stop()
    support_ids = {sample_id(encode_sample(x)) for xs in support.values() for x in xs}
    support_ids.add(sample_id(encode_sample(posted)))
    with transaction(server_ctx.factory) as s:
        uploaded = set(s.scalars(select(Sample.sample_id)))
    assert len(uploaded) == 200 and not uploaded & support_ids
