"""The agent supervisor: builds the services, starts each on its own guarded thread (a loop
that crashes is logged and restarted), and stops them. Inference never waits for the network.

Services (``edge_agent.services``): inference (predict, keep labelled inputs, queue uploads),
uploader, reporter (registration, heartbeats), updater (the update state machine with
probation and rollback), watcher (WatchUpdates stream), governor (DRESS subnet under budget),
and the optional learner (``edge_agent.learner``). They share state only through
:class:`~edge_agent.connection.Connection` and the objects handed to them here.
"""

from __future__ import annotations

import logging
import threading

from edge_agent import snapshot
from edge_agent.backoff import Backoff
from edge_agent.client import FleetClient
from edge_agent.connection import Connection
from edge_agent.disk_budget import DataDirBudget
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.predictions import PredictionLog
from edge_agent.probation import ProbationConfig
from edge_agent.runner import ModelRunner
from edge_agent.services import Service
from edge_agent.services.governor_service import GovernorService
from edge_agent.services.inference import InferenceService, make_source
from edge_agent.services.reporter import ReporterService
from edge_agent.services.updater_service import UpdaterService
from edge_agent.services.uploader import UploaderService
from edge_agent.services.watcher import WatcherService
from edge_agent.settings import AgentSettings
from edge_agent.sources import InputSource
from edge_agent.status_http import StatusServer
from edge_agent.tls import ClientCertStore, PinnedCA
from edge_agent.trust import TrustStore
from edge_agent.update_machine import UpdateContext, UpdateMachine
from edge_agent.update_state import State, UpdateRecord, UpdateStateFile
from edge_agent.updater import Updater
from edge_agent.upload_policy import UploadPolicy
from edge_agent.upload_queue import UploadQueue

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0  # before a crashed service loop runs again


class Agent:
    def __init__(self, settings: AgentSettings, source: InputSource | None = None) -> None:
        s = self.settings = settings
        # First: no CA pinned and not insecure refuses to start (TLSSetupError) before any work.
        pinned = PinnedCA.from_settings(s)
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(s.data_dir / "models", max_parameters=s.max_model_parameters)
        self.runner = ModelRunner()
        self._load_installed()
        self.queue = UploadQueue(s.data_dir / "upload_queue.db", max_items=s.queue_max_items,
                                 max_bytes=s.queue_max_bytes)
        self.local_data = LocalDataset(s.data_dir / "local_data.db", s.local_data_max_items)
        self.predictions = PredictionLog(s.predictions_window)
        self.source = source if source is not None else make_source(
            s, self.runner.arch.input_shape if self.runner.arch else None)
        self.conn = Connection(s, FleetClient(s.server, timeout_s=s.rpc_timeout_s, tls=pinned,
                                              server_name=s.tls_server_name,
                                              client_cert=ClientCertStore(s.data_dir / "tls")))
        # Signing keys: pinned from trusted_keys_file, else from the Register answer at enrollment.
        self.trust = TrustStore(s.data_dir, pinned_file=s.trusted_keys_file)
        self.conn.on_registered = lambda resp: self.trust.pin_at_enrollment(resp.signing_public_keys)
        if self.conn.registered and not self.trust.pinned:
            log.error("no artefact-signing key is pinned (enrolled before signing existed): no update can be "
                      "installed; set trusted_keys_file, or remove identity.json to enrol again")
        self.fetcher = Updater(self.conn.client, s.data_dir, max_artefact_bytes=s.max_artefact_bytes,
                               chunk_bytes=s.chunk_bytes, trust=self.trust, budget=DataDirBudget(
                                   s.data_dir, s.max_data_dir_bytes,
                                   reserved={"upload_queue.db*": s.queue_max_bytes}),
                               max_parameters=s.max_model_parameters)
        self.governor = GovernorService(s, self.runner, self.conn.subnet_accuracy, self.conn.report_error)
        self.support = None  # the few-shot support set (edge_agent.few_shot), with learner=pmeta
        self.domains = None  # the domain adaptors' switch (edge_agent.domains), with learner=da3
        self.learner = self._make_learner()
        self.reporter = ReporterService(self.conn, lambda: snapshot.heartbeat_request(self), self._backoff())
        ctx = UpdateContext(self.fetcher, self.store, self.runner, self.local_data, ProbationConfig(
            s.probation_margin, s.probation_min_samples, s.probation_samples))
        self.machine = UpdateMachine(ctx, UpdateStateFile(s.data_dir / "update_state.json", self.store.rekeyed),
                                     on_outcome=self._on_outcome)
        self.inference = InferenceService(
            self.source, self.runner, batch=s.inference_batch, predictions=self.predictions,
            policy=UploadPolicy(s.upload_mode, confidence_threshold=s.confidence_threshold,
                                max_per_minute=s.max_uploads_per_minute or None),
            queue=self.queue, local_data=self.local_data, observe=self.governor.observe)
        self.uploader = UploaderService(self.conn, self.queue, batch=s.upload_batch,
                                        interval_s=s.upload_interval_s, backoff=self._backoff())
        self.updater = UpdaterService(self.conn, self.machine, self._running_hash,
                                      retry=self._backoff(4), link_backoff=self._backoff())
        self.watcher = WatcherService(self.conn, self._running_hash, self._backoff())
        self.services: list[Service] = [self.inference, self.uploader, self.reporter, self.updater,
                                        self.watcher, self.governor]
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.status_server: StatusServer | None = None

    def _backoff(self, scale: float = 1.0) -> Backoff:
        return Backoff(self.settings.backoff_initial_s * scale, self.settings.backoff_max_s * scale)

    def _running_hash(self) -> str:
        return self.runner.model_hash

    def _load_installed(self) -> None:
        installed = self.store.current()
        if installed is None:
            return
        try:
            self.runner.load(installed.arch, installed.state, installed.model_hash)
            log.info("running installed model %s", installed.model_hash[:12])
        except Exception:  # noqa: BLE001 - the update machine's resume decides what follows
            log.exception("installed model %s does not load", installed.model_hash[:12])

    def _make_learner(self):
        if self.settings.learner == "none":
            return None
        from edge_agent.learner import LearnerService
        from edge_agent.personal_store import PersonalStore

        store = PersonalStore(self.store.root)
        if self.settings.learner == "pmeta":  # few-shot: learns from the support set, not local data
            from edge_agent.few_shot import SupportSet, learner_overrides

            self.support = SupportSet(self.settings.data_dir / "few-shot", self._input_shape)
            return LearnerService(self.settings, self.runner, store, self.support,
                                  config_overrides=learner_overrides(self.support, self.governor),
                                  min_samples=self.settings.few_shot_min_samples, compare_base=False)
        if self.settings.learner == "da3":  # one adaptor per domain; the governor's memory budget
            from edge_agent.domains import Domains, DomainStore

            domain_store = DomainStore(self.store.root)
            service = LearnerService(self.settings, self.runner, domain_store, self.local_data,
                                     config_overrides=lambda: {
                                         "memory_budget_mb": self.governor.current_budget().memory_mb})
            self.domains = Domains(self.settings.data_dir, domain_store, setting=self.settings.learner_domain,
                                   tags=self.settings.tag_list, on_change=lambda _d: service.reconsider())
            return service
        return LearnerService(self.settings, self.runner, store, self.local_data)

    def _input_shape(self) -> tuple[int, ...] | None:
        arch = self.runner.arch
        return arch.input_shape if arch is not None else None

    def _on_outcome(self, record: UpdateRecord) -> None:
        """An update reached a resting state: tell the server and the services that care.

        The heartbeat waits for the governor to have profiled the model now running (on the
        governor's thread; inference never waits), so the server's first view of a new
        DRESS model carries its governor metrics, as it did when one loop did both."""
        self.governor.refresh_then(self.reporter.wake)
        if self.learner is not None and record.state in (State.COMMITTED, State.ROLLED_BACK):
            self.learner.base_changed(self.store.current_hash())

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.learner is not None:
            # Declare the committed base before any thread starts, so the learner never
            # derives on a model still on probation ("" = nothing committed yet, e.g. a new
            # device), and the updater's first outcome cannot be overwritten by this one.
            if self.machine.state in (State.PROBATION, State.ROLLING_BACK):
                self.learner.base_changed(self.machine.record.previous_hash or "")
            else:
                self.learner.base_changed(self.store.current_hash() or "")
        for service in self.services:
            t = threading.Thread(target=self._guard, args=(service,), name=service.name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.learner is not None:
            self.learner.start()
        if self.settings.status_port >= 0:
            self.status_server = StatusServer(
                self.settings.status_host, self.settings.status_port, self.status,
                on_put_budget=self.governor.http_budget.on_put,
                on_post_few_shot=self._post_few_shot if self.support is not None else None,
                on_put_domain=self.domains.on_put if self.domains is not None else None,
                token=self.settings.status_token)
            self.status_server.start()
            log.info("status endpoint http://%s:%d/status", self.settings.status_host, self.status_server.port)

    def _post_few_shot(self, body: dict) -> dict:
        """POST /few-shot: store a support sample, then let the learner re-adapt at once."""
        assert self.support is not None
        result = self.support.on_post(body)
        if self.learner is not None:
            self.learner.wake()
        return result

    def _guard(self, service: Service) -> None:
        while not self.stop_event.is_set():
            try:
                service.run(self.stop_event)
                return
            except Exception:  # noqa: BLE001 - a service must never die silently
                log.exception("%s service crashed; restarting in %.0f s", service.name, RESTART_DELAY_S)
                self.stop_event.wait(RESTART_DELAY_S)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for service in self.services:
            interrupt = getattr(service, "interrupt", None)
            if callable(interrupt):
                interrupt()
        self.conn.client.close()  # unblocks streaming calls
        for t in self._threads:
            t.join(timeout)
        if self.learner is not None:
            self.learner.stop()
        if self.status_server is not None:
            self.status_server.stop()
        self.source.close()
        self.queue.close()
        self.local_data.close()

    # --- views --------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        return snapshot.metrics(self)

    def status(self) -> dict:
        view = snapshot.status(self)
        if self.support is not None:  # classes and shots only: the samples never leave the device
            view["few_shot"] = self.support.status()
        if self.domains is not None:
            view["domains"] = self.domains.status()
        return view


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
