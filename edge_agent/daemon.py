"""The agent daemon: inference never waits for the network.

Five threads share local state only:
- inference: poll the input source, predict, log predictions, queue samples to upload;
- uploader: drain the on-disk queue to the server, acknowledging only committed samples;
- control: register, heartbeat, run the updater when the target version changes, and profile
  the DRESS subnets of every new model on this device;
- watcher: hold a WatchUpdates stream so a new version is noticed at once, not at the next
  heartbeat;
- governor: every ``governor_interval_s``, and at once after a PUT /budget, let the
  :class:`~edge_agent.governor.BudgetGovernor` pick the DRESS subnet that fits the budgets in
  force (thesis §3.1) and switch the runner to it.
Network failures are retried with exponential backoff and jitter; the queue is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from edge_agent.backoff import Backoff
from edge_agent.budget_sources import (
    BatteryBudgetSource,
    Budget,
    BudgetError,
    FileBudgetSource,
    HttpBudgetSource,
    LoadBudgetSource,
    StaticBudgetSource,
)
from edge_agent.client import (
    ClientError,
    CredentialRejected,
    FleetClient,
    PermanentError,
    TransientError,
)
from edge_agent.governor import BudgetGovernor, Decision
from edge_agent.identity import Identity, hardware_id, load_identity, save_identity
from edge_agent.model_store import ModelStore
from edge_agent.predictions import PredictionLog
from edge_agent.profiling import profile_subnets
from edge_agent.runner import ModelRunner
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource, FolderWatchSource, InputSource, Observation
from edge_agent.status_http import StatusServer
from edge_agent.updater import UpdateFailed, Updater
from edge_agent.upload_policy import UploadPolicy
from edge_agent.upload_queue import QueuedSample, UploadQueue
from protos.edgeloop.v1 import fleet_pb2 as pb
from shared.samples import encode_sample, sample_id

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"


def make_source(settings: AgentSettings, input_shape: tuple[int, ...] | None = None) -> InputSource:
    if settings.source == "folder":
        if input_shape is None:
            raise ValueError("a folder source needs the model input shape")
        return FolderWatchSource(settings.watch_dir, input_shape, state_file=settings.data_dir / "folder_state.json")
    from shared.data import load_dataset, shard_non_iid

    ds = load_dataset(settings.dataset)
    x, y = (ds.x_train, ds.y_train) if settings.dataset_split == "train" else (ds.x_test, ds.y_test)
    shard = shard_non_iid(y, settings.num_shards, alpha=settings.shard_alpha, seed=settings.shard_seed)[settings.shard_index]
    if settings.max_samples:
        shard = shard[: settings.max_samples]
    return DatasetShardSource(x[shard], y[shard], rate_per_s=settings.rate_per_s or float("inf"),
                              seed=settings.shard_seed + settings.shard_index, loop=settings.loop_source,
                              send_labels=settings.send_labels)


def budget_sources(
    settings: AgentSettings, http: HttpBudgetSource
) -> tuple[list, BatteryBudgetSource | None]:
    """The budget sources the settings ask for (the HTTP one always: PUT /budget), and the
    battery source, whose measured power also prices energy."""
    static = Budget(settings.budget_latency_ms, settings.budget_memory_mb,
                    settings.budget_energy_mj)
    sources: list = [StaticBudgetSource(static), http]
    if settings.budget_file is not None:
        sources.append(FileBudgetSource(settings.budget_file))
    battery = BatteryBudgetSource(policy=settings.battery_policy_obj) if settings.battery else None
    if battery is not None:
        sources.append(battery)
    if settings.load_budget:
        sources.append(LoadBudgetSource())
    return sources, battery


def merged_budget(sources: list) -> Budget:
    """The budget in force: the tightest field over all sources, then every ``tighten``
    (the governor's own merge, for when no DRESS model is governed). A failing source counts
    as no limit here: this only reports."""
    budgets = []
    for s in sources:
        try:
            budgets.append(s.read())
        except Exception:  # noqa: BLE001 - reporting must not break heartbeats
            log.debug("budget source %s failed", getattr(s, "name", s), exc_info=True)
    merged = Budget.merge(*budgets)
    for s in sources:
        tighten = getattr(s, "tighten", None)
        if callable(tighten):
            try:
                merged = tighten(merged)
            except Exception:  # noqa: BLE001
                log.debug("budget source %s could not tighten", getattr(s, "name", s),
                          exc_info=True)
    return merged


class Agent:
    def __init__(self, settings: AgentSettings, source: InputSource | None = None) -> None:
        self.settings = settings
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_event = threading.Event()
        self.wake_control = threading.Event()
        self.store = ModelStore(data_dir / "models")
        self.runner = ModelRunner()
        installed = self.store.current()
        if installed is not None:
            self.runner.load(installed.arch, installed.state, installed.model_hash)
            log.info("running installed model %s", installed.model_hash[:12])
        self.queue = UploadQueue(data_dir / "upload_queue.db", max_items=settings.queue_max_items,
                                 max_bytes=settings.queue_max_bytes)
        self.predictions = PredictionLog(settings.predictions_window)
        self.policy = UploadPolicy(settings.upload_mode, confidence_threshold=settings.confidence_threshold,
                                   max_per_minute=settings.max_uploads_per_minute or None)
        self.source = source if source is not None else make_source(
            settings, self.runner.arch.input_shape if self.runner.arch else None)
        self.client = FleetClient(settings.server, timeout_s=settings.rpc_timeout_s)
        self.updater = Updater(self.client, self.store, self.runner, data_dir,
                               max_artefact_bytes=settings.max_artefact_bytes, chunk_bytes=settings.chunk_bytes)
        self.identity: Identity | None = load_identity(data_dir)
        if self.identity is not None and self.identity.server != settings.server:
            log.info("identity was issued by %s; keeping it for %s", self.identity.server, settings.server)
        self.identity_lock = threading.Lock()
        self.target_hash = ""
        self.last_error = ""
        self.heartbeat_interval = settings.heartbeat_interval_s or 5.0
        self.uploaded = 0
        self.rejected = 0
        self.connected = False
        self.status_server: StatusServer | None = None
        # Recent labelled inputs: each new model is scored on them right after install, so
        # its accuracy is known before fresh labelled inputs arrive.
        self.recent_labelled: deque[tuple[np.ndarray, int]] = deque(maxlen=512)
        self.recent_accuracy: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        # DRESS budget governor. The HTTP source exists even while a plain model runs, so a
        # budget PUT then still holds once a DRESS model arrives.
        self.wake_governor = threading.Event()
        self.http_budget = HttpBudgetSource(on_change=lambda _b: self.wake_governor.set())
        self.budget_sources, self.battery = budget_sources(settings, self.http_budget)
        self.governor: BudgetGovernor | None = None
        self.governed_hash = ""  # the model whose profiles the governor holds
        self.profiled_hash: tuple[str, bool] | None = None  # (model, with accuracies) last profiled
        self.subnet_accuracy: dict[str, list[float]] = {}  # server-reported, per model hash
        self.profile_seconds = 0.0
        self._govern_lock = threading.Lock()  # decide + apply: one decision lands at a time

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for name, fn in (("inference", self._inference_loop), ("uploader", self._upload_loop),
                         ("control", self._control_loop), ("watcher", self._watch_loop),
                         ("governor", self._governor_loop)):
            t = threading.Thread(target=self._guard(fn), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.settings.status_port >= 0:
            self.status_server = StatusServer(
                self.settings.status_host, self.settings.status_port, self.status,
                on_put_budget=self.http_budget.on_put)
            self.status_server.start()
            log.info("status endpoint http://%s:%d/status", self.settings.status_host, self.status_server.port)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.wake_control.set()
        self.wake_governor.set()
        self.client.close()  # unblocks streaming calls
        for t in self._threads:
            t.join(timeout)
        if self.status_server is not None:
            self.status_server.stop()
        self.source.close()
        self.queue.close()

    def _guard(self, fn):
        def run() -> None:
            while not self.stop_event.is_set():
                try:
                    fn()
                    return
                except Exception:  # noqa: BLE001 - a thread must never die silently
                    log.exception("%s loop crashed; restarting in 1 s", threading.current_thread().name)
                    self.stop_event.wait(1.0)
        return run

    # --- inference ------------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        while not self.stop_event.is_set():
            batch = self.source.poll(self.settings.inference_batch)
            if not batch:
                self.stop_event.wait(0.05)
                continue
            self._handle(batch)

    def _handle(self, batch: list[Observation]) -> None:
        now = time.time()
        confs: np.ndarray | None = None
        if self.runner.arch is not None:
            shape = self.runner.arch.input_shape
            bad = [o for o in batch if tuple(o.x.shape) != shape]
            if bad:
                # The server would reject them anyway: do not spend the uplink on them.
                log.warning("dropping %d inputs of shape %s: the model takes %s", len(bad), bad[0].x.shape, shape)
                batch = [o for o in batch if tuple(o.x.shape) == shape]
                if not batch:
                    return
        if self.runner.ready:
            if self.runner.is_dress:
                preds, confs, hashes = self._predict_one_by_one(batch)
            else:
                out = self.runner.predict_timed(np.stack([o.x for o in batch]))
                preds, confs, hashes = out.pred, out.conf, [out.model_hash] * len(batch)
            for o, p, c, h in zip(batch, preds, confs, hashes, strict=True):
                self.predictions.add(int(p), float(c), o.label, h, now)
        for o in batch:
            if o.label is not None:
                self.recent_labelled.append((o.x, o.label))
        for i, o in enumerate(batch):
            confidence = float(confs[i]) if confs is not None else 0.0
            if not self.policy.should_upload(confidence):
                continue
            payload = encode_sample(o.x)
            self.queue.put(QueuedSample(sample_id(payload), payload, o.label, dict(o.metadata), now))

    def _predict_one_by_one(
        self, batch: list[Observation]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """DRESS: batch-1 calls, the quantity the subnets were profiled with, each timing fed to
        the governor's drift estimate (a 32-input batch would read as a 32x slowdown)."""
        preds, confs, hashes = [], [], []
        for o in batch:
            p = self.runner.predict_timed(o.x[None])
            preds.append(p.pred[0])
            confs.append(p.conf[0])
            hashes.append(p.model_hash)
            gov = self.governor
            if gov is not None and p.subnet >= 0 and p.model_hash == self.governed_hash:
                try:
                    gov.observe_latency(p.subnet, p.forward_ms)
                except BudgetError:  # profiles replaced by a new model's in the meantime
                    pass
        return np.array(preds), np.array(confs, dtype=np.float32), hashes

    # --- budget governor -------------------------------------------------------------------------
    def _power_w(self) -> float | None:
        return self.battery.power_w if self.battery is not None else None

    def _refresh_profiles(self) -> None:
        """Profile the running model's subnets if it changed since the last profile (control
        thread; inference keeps running on its own runner meanwhile), then hand the profiles
        to the governor and apply its fresh decision."""
        model_hash = self.runner.model_hash
        accuracies = self.subnet_accuracy.get(model_hash)
        if accuracies is not None and len(accuracies) != self.runner.num_subnets:
            accuracies = None
        key = (model_hash, accuracies is not None)  # profile again once accuracies arrive
        if key == self.profiled_hash:
            return
        self.profiled_hash = key  # also on failure: no retry loop on a broken model
        if not self.runner.is_dress:
            return
        t0 = time.perf_counter()
        profiles = profile_subnets(self.runner, self.settings.profile_reps, power_w=self._power_w(),
                                   accuracies=accuracies)
        self.profile_seconds = time.perf_counter() - t0
        with self._govern_lock:
            if self.governor is None:
                s = self.settings
                self.governor = BudgetGovernor(
                    profiles, self.budget_sources, hysteresis=s.governor_hysteresis,
                    min_dwell_s=s.governor_min_dwell_s, power_w=self._power_w)
                decision = self.governor.decide()
            else:
                decision = self.governor.update_profiles(profiles)
            self.governed_hash = model_hash
            self._apply(decision, model_hash)
        log.info("profiled %d subnets of %s in %.2f s; running subnet %d (%s)", len(profiles),
                 model_hash[:12], self.profile_seconds, self.runner.active_subnet, decision.reason)

    def _apply(self, decision: Decision, model_hash: str) -> None:
        if self.runner.active_subnet == decision.subnet:
            return
        if self.runner.set_subnet(decision.subnet, model_hash):
            log.info("running subnet %d: %s", decision.subnet, decision.reason)

    def _govern(self) -> Decision | None:
        """One decision for the governed model, applied; None while no DRESS model is governed."""
        with self._govern_lock:
            gov, model_hash = self.governor, self.governed_hash
            if gov is None or model_hash != self.runner.model_hash:
                return None
            decision = gov.decide()
            self._apply(decision, model_hash)
            return decision

    def _governor_loop(self) -> None:
        while not self.stop_event.is_set():
            self._govern()
            self.wake_governor.wait(self.settings.governor_interval_s)
            self.wake_governor.clear()

    @property
    def governed(self) -> BudgetGovernor | None:
        """The governor, while its profiles belong to the running model."""
        gov = self.governor
        return gov if gov is not None and self.governed_hash == self.runner.model_hash else None

    def current_budget(self) -> Budget:
        gov = self.governed
        decision = gov.last_decision if gov is not None else None
        return decision.budget if decision is not None else merged_budget(self.budget_sources)

    # --- uploads --------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while not self.stop_event.is_set():
            if self.identity is None:
                self.stop_event.wait(0.2)
                continue
            batch = self.queue.peek_batch(self.settings.upload_batch, 4 << 20)
            if not batch:
                self.stop_event.wait(self.settings.upload_interval_s)
                continue
            try:
                resp = self.client.upload(batch)
            except TransientError as exc:
                self._offline(exc)
                self.stop_event.wait(backoff.next_delay())
                continue
            except CredentialRejected:
                self._forget_identity()
                continue
            except PermanentError as exc:
                log.error("upload refused: %s", exc)
                self.last_error = str(exc)
                self.stop_event.wait(backoff.next_delay())
                continue
            backoff.reset()
            self.connected = True
            self.queue.ack(list(resp.committed_ids) + [r.sample_id for r in resp.rejected])
            self.uploaded += resp.accepted
            if resp.rejected:
                self.rejected += len(resp.rejected)
                log.warning("%d samples rejected by the server: %s", len(resp.rejected), resp.rejected[0].reason)

    # --- control: registration, heartbeats, updates ----------------------------------------------
    def _offline(self, exc: Exception) -> None:
        if self.connected:
            log.warning("server unreachable: %s", exc)
        self.connected = False

    def _forget_identity(self) -> None:
        with self.identity_lock:
            log.warning("server rejected our credential; registering again")
            self.identity = None
            self.client.credential = ""

    def _ensure_identity(self) -> None:
        with self.identity_lock:
            if self.identity is not None:
                self.client.credential = self.identity.credential
                return
            s = self.settings
            resp = self.client.register(enrollment_token=s.enrollment_token,
                                        hardware_id=hardware_id(s.data_dir, s.hardware_id),
                                        name=s.name, tags=s.tag_list, agent_version=AGENT_VERSION)
            self.identity = Identity(resp.device_id, resp.device_credential, s.server)
            save_identity(s.data_dir, self.identity)
            self.client.credential = resp.device_credential
            if not s.heartbeat_interval_s and resp.heartbeat_interval_s > 0:
                self.heartbeat_interval = resp.heartbeat_interval_s
            log.info("registered as device %s", resp.device_id)

    def _heartbeat(self) -> None:
        budget = {k: v for k, v in self.current_budget().to_dict().items() if v is not None}
        resp = self.client.heartbeat(pb.HeartbeatRequest(
            model_hash=self.runner.model_hash, active_subnet=self.runner.active_subnet,
            budget=pb.Budget(**budget), metrics=self.metrics(),
            state=self.updater.state, last_error=self.last_error, samples_pending=len(self.queue),
        ))
        self.connected = True
        self.target_hash = resp.target_model_hash
        if resp.target_subnet_accuracy:
            self.subnet_accuracy[resp.target_model_hash] = [float(a) for a in resp.target_subnet_accuracy]
        if not self.settings.heartbeat_interval_s and resp.heartbeat_interval_s > 0:
            self.heartbeat_interval = resp.heartbeat_interval_s

    def _control_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        update_backoff = Backoff(self.settings.backoff_initial_s * 4, self.settings.backoff_max_s * 4)
        next_update_try = 0.0
        while not self.stop_event.is_set():
            delay = self.heartbeat_interval
            self._refresh_profiles_safely()
            try:
                self._ensure_identity()
                self._heartbeat()
                backoff.reset()
                if self.target_hash and self.target_hash != self.runner.model_hash and time.monotonic() >= next_update_try:
                    self.updater.update_to(self.target_hash)
                    self.last_error = ""
                    self._score_recent()
                    self._refresh_profiles_safely()
                    update_backoff.reset()
                    self._heartbeat()  # report the new version at once
            except CredentialRejected:
                self._forget_identity()
                delay = backoff.next_delay()
            except TransientError as exc:
                self._offline(exc)
                delay = backoff.next_delay()
            except (UpdateFailed, PermanentError) as exc:
                log.error("update failed, keeping model %s: %s", self.runner.model_hash[:12] or "none", exc)
                self.last_error = str(exc)
                self.updater.state = "error"
                next_update_try = time.monotonic() + update_backoff.next_delay()
                delay = min(delay, 1.0)
            except ClientError as exc:
                self._offline(exc)
                delay = backoff.next_delay()
            self.wake_control.wait(delay)
            self.wake_control.clear()

    def _refresh_profiles_safely(self) -> None:
        try:
            self._refresh_profiles()
        except Exception as exc:  # noqa: BLE001 - the model keeps running on its current subnet
            log.exception("profiling model %s failed", self.runner.model_hash[:12])
            self.last_error = f"profiling failed: {exc}"

    def _watch_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while not self.stop_event.is_set():
            if self.identity is None:
                self.stop_event.wait(0.2)
                continue
            try:
                for msg in self.client.watch(self.runner.model_hash):
                    backoff.reset()
                    if self.stop_event.is_set():
                        return
                    if msg.target_model_hash and msg.target_model_hash != self.runner.model_hash:
                        self.target_hash = msg.target_model_hash
                        self.wake_control.set()
            except CredentialRejected:
                self.stop_event.wait(backoff.next_delay())
            except ClientError:
                self.stop_event.wait(backoff.next_delay())

    def _score_recent(self) -> None:
        items = list(self.recent_labelled)
        if not items or not self.runner.ready:
            return
        preds, _ = self.runner.predict(np.stack([x for x, _ in items]))
        acc = float(np.mean(preds == np.array([y for _, y in items])))
        self.recent_accuracy[self.runner.model_hash] = acc
        log.info("model %s: %.2f%% on the %d most recent labelled inputs", self.runner.model_hash[:12], 100 * acc, len(items))

    # --- reporting -------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        summary = self.predictions.summary()
        acc = self.predictions.accuracy(self.runner.model_hash) if self.runner.model_hash else None
        m = {
            "predictions": float(summary.get("count", 0)),
            "queue_len": float(len(self.queue)),
            "queue_dropped": float(self.queue.dropped),
            "uploaded": float(self.uploaded),
            "rejected": float(self.rejected),
            "bytes_downloaded": float(self.updater.stats.bytes_downloaded),
            "artefacts_installed": float(self.updater.stats.artefacts_installed),
            "update_failures": float(self.updater.stats.failures),
            "source_exhausted": float(bool(getattr(self.source, "exhausted", False))),
        }
        if acc is not None:
            m["accuracy"] = float(acc)
        recent = self.recent_accuracy.get(self.runner.model_hash)
        if recent is not None:
            m["recent_accuracy"] = recent
        gov = self.governed
        if gov is not None:
            m.update(gov.metrics())
            m["profile_seconds"] = self.profile_seconds
        m["active_subnet"] = float(self.runner.active_subnet)  # what runs, not what was decided
        return m

    def status(self) -> dict:
        return {
            "device_id": self.identity.device_id if self.identity else None,
            "server": self.settings.server,
            "connected": self.connected,
            "model_hash": self.runner.model_hash,
            "target_model_hash": self.target_hash,
            "update_state": self.updater.state,
            "last_error": self.last_error,
            "metrics": self.metrics(),
            "predictions": self.predictions.summary(),
            "runner": self.runner.describe(),
            "budget": self.current_budget().to_dict(),
            "governor": gov.status() if (gov := self.governed) is not None else None,
            "profiles": [p.to_dict() for p in gov.profiles] if gov is not None else [],
        }


def run_agent(settings: AgentSettings) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    agent = Agent(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    stop.wait()
    agent.stop()

