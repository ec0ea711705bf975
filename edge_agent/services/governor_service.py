"""The budget governor service: profile each new DRESS model's subnets on this device, then
every ``governor_interval_s`` (and at once after a PUT /budget) let the
:class:`~edge_agent.governor.BudgetGovernor` pick the subnet that fits the budgets in force
(thesis §3.1) and switch the runner to it. Profiling runs on this service's thread; inference
keeps running on the live runner meanwhile. :meth:`GovernorService.refresh_then` runs a
callback once that thread has profiled (and governed) the model running at the time of the
call, so a heartbeat sent right after an update already carries the new model's governor
metrics, with no second profile on another thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_agent.budget_sources import (
    BatteryBudgetSource,
    Budget,
    BudgetError,
    FileBudgetSource,
    HttpBudgetSource,
    LoadBudgetSource,
    StaticBudgetSource,
)
from edge_agent.governor import BudgetGovernor, Decision
from edge_agent.profiling import profile_subnets
from edge_agent.runner import ModelRunner, Prediction
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)


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


class GovernorService:
    name = "governor"

    def __init__(self, settings: AgentSettings, runner: ModelRunner,
                 accuracies: Callable[[str], list[float] | None],
                 report_error: Callable[[str], None]) -> None:
        self.settings = settings
        self.runner = runner
        self._accuracies = accuracies  # server-reported subnet accuracies of a model hash
        self._report_error = report_error
        self._wake = threading.Event()
        # The HTTP source exists even while a plain model runs, so a budget PUT then still
        # holds once a DRESS model arrives.
        self.http_budget = HttpBudgetSource(on_change=lambda _b: self._wake.set())
        self.sources, self.battery = budget_sources(settings, self.http_budget)
        self.governor: BudgetGovernor | None = None
        self.governed_hash = ""  # the model whose profiles the governor holds
        self._profiled: tuple[str, bool] | None = None  # (model, with accuracies) last profiled
        self.profile_seconds = 0.0
        self._lock = threading.Lock()  # decide + apply: one decision lands at a time
        self._pending: list[Callable[[], None]] = []  # refresh_then callbacks not yet run
        self._pending_lock = threading.Lock()

    # --- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # Taken before the refresh: each callback waits for a refresh that began after
            # it was asked for (one asked meanwhile has set _wake and runs next time round).
            with self._pending_lock:
                pending, self._pending = self._pending, []
            self._refresh_safely()
            self.govern()
            for callback in pending:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - a listener must not stop the governor
                    log.exception("governor refresh listener failed")
            self._wake.wait(self.settings.governor_interval_s)
            self._wake.clear()

    def interrupt(self) -> None:
        self._wake.set()

    def wake(self) -> None:
        """Re-check at once (a new model is running)."""
        self._wake.set()

    def refresh_then(self, callback: Callable[[], None]) -> None:
        """Re-check at once, and call ``callback`` on this service's thread once the model
        running now is profiled (if it is new) and governed. Returns at once."""
        with self._pending_lock:
            self._pending.append(callback)
        self._wake.set()

    # --- profiles ---------------------------------------------------------------------------
    def _power_w(self) -> float | None:
        return self.battery.power_w if self.battery is not None else None

    def _refresh_safely(self) -> None:
        try:
            self.refresh_profiles()
        except Exception as exc:  # noqa: BLE001 - the model keeps running on its current subnet
            log.exception("profiling model %s failed", self.runner.model_hash[:12])
            self._report_error(f"profiling failed: {exc}")

    def refresh_profiles(self) -> None:
        """Profile the running model's subnets if it changed since the last profile (or its
        accuracies arrived), hand the profiles to the governor and apply its decision."""
        model_hash = self.runner.model_hash
        accuracies = self._accuracies(model_hash)
        if accuracies is not None and len(accuracies) != self.runner.num_subnets:
            accuracies = None
        key = (model_hash, accuracies is not None)  # profile again once accuracies arrive
        if key == self._profiled:
            return
        self._profiled = key  # also on failure: no retry loop on a broken model
        if not self.runner.is_dress:
            return
        t0 = time.perf_counter()
        profiles = profile_subnets(self.runner, self.settings.profile_reps, power_w=self._power_w(),
                                   accuracies=accuracies)
        self.profile_seconds = time.perf_counter() - t0
        with self._lock:
            if self.governor is None:
                s = self.settings
                self.governor = BudgetGovernor(
                    profiles, self.sources, hysteresis=s.governor_hysteresis,
                    min_dwell_s=s.governor_min_dwell_s, power_w=self._power_w)
                decision = self.governor.decide()
            else:
                decision = self.governor.update_profiles(profiles)
            # Applied before it counts as governed: a reader that sees ``governed`` then also
            # sees the runner on the decided subnet.
            self._apply(decision, model_hash)
            self.governed_hash = model_hash
        log.info("profiled %d subnets of %s in %.2f s; running subnet %d (%s)", len(profiles),
                 model_hash[:12], self.profile_seconds, self.runner.active_subnet, decision.reason)

    # --- decisions --------------------------------------------------------------------------
    def _apply(self, decision: Decision, model_hash: str) -> None:
        if self.runner.active_subnet == decision.subnet:
            return
        if self.runner.set_subnet(decision.subnet, model_hash):
            log.info("running subnet %d: %s", decision.subnet, decision.reason)

    def govern(self) -> Decision | None:
        """One decision for the governed model, applied; None while no DRESS model is governed."""
        with self._lock:
            gov, model_hash = self.governor, self.governed_hash
            if gov is None or model_hash != self.runner.model_hash:
                return None
            decision = gov.decide()
            self._apply(decision, model_hash)
            return decision

    def observe(self, p: Prediction) -> None:
        """A batch-1 timing from inference, for the governor's latency-drift estimate."""
        gov = self.governor
        if gov is not None and p.subnet >= 0 and p.model_hash == self.governed_hash:
            try:
                gov.observe_latency(p.subnet, p.forward_ms)
            except BudgetError:  # profiles replaced by a new model's in the meantime
                pass

    # --- reporting --------------------------------------------------------------------------
    @property
    def governed(self) -> BudgetGovernor | None:
        """The governor, while its profiles belong to the running model."""
        gov = self.governor
        return gov if gov is not None and self.governed_hash == self.runner.model_hash else None

    def current_budget(self) -> Budget:
        gov = self.governed
        decision = gov.last_decision if gov is not None else None
        return decision.budget if decision is not None else merged_budget(self.sources)

    def metrics(self) -> dict[str, float]:
        gov = self.governed
        if gov is None:
            return {}
        return {**gov.metrics(), "profile_seconds": self.profile_seconds}

    def status(self) -> dict:
        gov = self.governed
        return {"budget": self.current_budget().to_dict(),
                "governor": gov.status() if gov is not None else None,
                "profiles": [p.to_dict() for p in gov.profiles] if gov is not None else []}
