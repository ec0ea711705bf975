"""What each update state does, and the driver that moves through :data:`TRANSITIONS`.

One small handler per working state; each returns exactly one :class:`Step` (an event and a
reason) and delegates the work: :class:`~edge_agent.updater.Updater` downloads and verifies,
:class:`~edge_agent.model_store.ModelStore` switches the pointer, :mod:`edge_agent.probation`
judges. The driver persists the record *before* the next state acts (Mender's ``SaveState``)
and, on start-up, re-enters what :data:`RESUME` says. A handler that raises stands for its
state's :data:`ON_ERROR` event, so no exception leaves a half-switched model behind.

Housekeeping keeps the data directory bounded under any sequence of crashes: at start-up and
on every resting state, ``downloads/`` is cut to the part file of the download being resumed
(nothing, when none is) and the model store to its current and previous models (temp files of
interrupted writes included).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from edge_agent.client import PermanentError, TransientError
from edge_agent.download import DownloadError, remove_temp_files
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import InstalledModel, ModelStore, ModelStoreError
from edge_agent.probation import ProbationConfig, judge
from edge_agent.runner import ModelRunner
from edge_agent.update_state import (
    MAX_RESUMES,
    ON_ERROR,
    RESTING,
    RESUME,
    WORKING,
    Event,
    Probation,
    RollbackReport,
    State,
    UpdateRecord,
    UpdateStateError,
    UpdateStateFile,
    next_state,
    now_ms,
    short,
)
from edge_agent.updater import MAX_CHAIN, Downloaded, UpdateFailed, Updater, Working
from shared.tensors import tensors_hash

log = logging.getLogger(__name__)
E, S = Event, State


class Step(NamedTuple):
    event: Event
    reason: str
    probation: Probation | None = None


@dataclass
class UpdateContext:
    """Everything the states act on, injected (tests pass small real ones)."""

    updater: Updater
    store: ModelStore
    runner: ModelRunner
    local_data: LocalDataset
    probation: ProbationConfig


class UpdateMachine:
    """Drives one update at a time; thread-compatible: one thread runs it, any thread reads
    :attr:`record` (an immutable value swapped whole)."""

    def __init__(self, ctx: UpdateContext, state_file: UpdateStateFile, *,
                 on_outcome: Callable[[UpdateRecord], None] | None = None,
                 max_resumes: int = MAX_RESUMES) -> None:
        self.ctx = ctx
        self.file = state_file
        self.on_outcome = on_outcome
        self.max_resumes = max_resumes
        self.record = state_file.load()
        self.scores: dict[str, float] = {}  # model hash -> accuracy on the local labels
        self._lock = threading.Lock()  # one driver (start or run) at a time
        # In-memory progress of the current update (lost on a crash; RESUME redoes it).
        self._working: Working | None = None
        self._downloaded: Downloaded | None = None
        self._chain: list[str] = []
        self._resume()
        self._tidy_at_start()

    # --- reading ----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.record.state

    def rejected(self, model_hash: str) -> RollbackReport | None:
        """The rollback report if this version was rolled back here (never retried)."""
        return self.record.rejected(model_hash)

    def status(self) -> dict:
        rec = self.record
        return {"state": rec.state.value, "target_hash": rec.target_hash,
                "previous_hash": rec.previous_hash, "reason": rec.reason,
                "updated_at_ms": rec.updated_at_ms,
                "probation": None if rec.probation is None else rec.probation.__dict__,
                "rollbacks": [r.__dict__ for r in rec.rollbacks]}

    # --- driving ----------------------------------------------------------------------------
    def start(self, target: str) -> None:
        """Begin an update to ``target`` from a resting state."""
        with self._lock:
            if self.rejected(target) is not None:
                raise UpdateStateError(f"model {target[:12]} was rolled back here; it is not retried")
            self._working, self._downloaded, self._chain = None, None, []
            previous = self.ctx.store.current_hash() or ""
            if previous == target:  # stored but not running (failed to load at start-up): redo it
                previous = self.ctx.store.previous_hash() or ""
            self._fire(E.START, f"server names {target[:12]}", target_hash=target,
                       previous_hash=previous, probation=None)

    def run(self, wanted: str | None) -> State:
        """Act on working states until a resting one, or until the download is suspended
        (link down, or ``wanted`` unknown yet because the server has not been reached)."""
        with self._lock:
            while self.state in WORKING:
                state = self.state
                if state is S.DOWNLOADING and wanted is None:
                    return state
                try:
                    step = _HANDLERS[state](self, wanted)
                except Exception as exc:  # noqa: BLE001 - a state that raises still ends safely
                    log.exception("update state %s failed", state.value)
                    step = Step(ON_ERROR[state], f"{state.value} failed: {exc}")
                self._fire(step.event, step.reason, **({"probation": step.probation}
                                                       if step.probation is not None else {}))
                if step.event is E.INTERRUPTED:  # suspended: the caller retries later
                    return self.state
            return self.state

    # --- internals --------------------------------------------------------------------------
    def _save(self, record: UpdateRecord) -> None:
        self.record = record
        try:
            self.file.save(record)
        except OSError:  # acting matters more than a resume point (failure states must run)
            log.exception("could not persist update state %s", record.state.value)

    @staticmethod
    def _entering(rec: UpdateRecord, old: State) -> UpdateRecord:
        """``rec`` as persisted on entering its state from ``old``: a rollback is recorded in
        the same write that enters rolling_back, so a crash can never forget it."""
        if rec.state is S.ROLLING_BACK and old is not S.ROLLING_BACK and rec.target_hash:
            return rec.with_rollback(RollbackReport(rec.target_hash, rec.reason, now_ms()))
        return rec

    @staticmethod
    def _resumes(old: UpdateRecord, new: State, restarted: bool) -> int:
        """Restarts counted against the crash-loop guard: per update (Mender counts per
        deployment), with a fresh count for the rollback, which must get its chance."""
        entering_rollback = new is S.ROLLING_BACK and old.state is not S.ROLLING_BACK
        return int(restarted) + (0 if entering_rollback else old.resumes)

    def _fire(self, event: Event, reason: str, **changes) -> None:
        old = self.record
        new = next_state(old.state, event)
        resumes = 0 if event is E.START else self._resumes(old, new, restarted=False)
        self._save(self._entering(
            replace(old, state=new, reason=short(reason), updated_at_ms=now_ms(), resumes=resumes,
                    **changes), old.state))
        level = logging.WARNING if new in (S.FAILED, S.ROLLING_BACK, S.ROLLED_BACK) else logging.INFO
        log.log(level, "update %s: %s -(%s)-> %s: %s", (self.record.target_hash or "-")[:12],
                old.state.value, event.value, new.value, reason)
        if new in RESTING:
            self._rest(new)

    def _resume(self) -> None:
        rec = self.record
        on_target = bool(rec.target_hash) and self.ctx.store.current_hash() == rec.target_hash
        state = RESUME[(rec.state, on_target)]
        if state is rec.state and state in RESTING:
            return
        resumes = self._resumes(rec, state, restarted=True)
        reason = rec.reason if state is rec.state else (
            f"the agent restarted in {rec.state.value}"
            + ("" if on_target else f", with {rec.target_hash[:12]} not the store's current model"))
        self._save(self._entering(
            replace(rec, state=state, resumes=resumes, updated_at_ms=now_ms(), reason=short(reason)),
            rec.state))
        log.warning("update %s: resuming in %s (was %s)", rec.target_hash[:12], state.value, rec.state.value)
        if state in RESTING:
            self._rest(state)
        elif resumes > self.max_resumes:
            self._fire(E.LOOP, f"restarted {resumes} times in {state.value}: state loop")

    def _housekeep(self, resume_target: str | None) -> None:
        """Keep only what a resume needs; never raises (a full disk must not stop updates)."""
        try:
            self.ctx.updater.tidy(resume_target)
        except Exception:  # noqa: BLE001
            log.exception("tidying downloads failed")
        try:
            self.ctx.store.gc(keep=2, discard=[r.model_hash for r in self.record.rollbacks])
        except Exception:  # noqa: BLE001
            log.exception("model store gc failed")

    def _tidy_at_start(self) -> None:
        """Before any state acts: what a crash left behind goes. Only a download being
        resumed keeps its part file; the store's pointer protects the models a probation or a
        rollback still needs."""
        # Temp files of atomic writes a kill interrupted: the record's own, and personal
        # models' (edge_agent.personal_store; no learner writes before the services start).
        for directory, name in ((self.file.path.parent, self.file.path.name),
                                (self.ctx.store.models_dir / "personal", "")):
            try:
                if directory.is_dir():
                    remove_temp_files(directory, name)
            except OSError:
                log.exception("removing temp files in %s failed", directory)
        downloading = self.state in (S.DOWNLOADING, S.VERIFYING)
        self._housekeep(self.record.target_hash if downloading else None)

    def _rest(self, state: State) -> None:
        """Housekeeping on reaching a resting state; never raises."""
        self._housekeep(None)
        self._working, self._downloaded, self._chain = None, None, []
        if self.on_outcome is not None and state is not S.IDLE:
            try:
                self.on_outcome(self.record)
            except Exception:  # noqa: BLE001 - a listener must not undo an outcome
                log.exception("update outcome listener failed")

    def _base(self) -> Working:
        """The model the update starts from: the record's previous model, from the store."""
        prev = self.record.previous_hash
        if not prev:
            return Working("", None, None)
        m = self.ctx.store.load(prev)
        return Working(m.model_hash, m.arch, m.state)

    def _load(self, model_hash: str) -> InstalledModel | None:
        if not model_hash:
            return None
        try:
            return self.ctx.store.load(model_hash)
        except ModelStoreError as exc:
            log.warning("model %s unavailable: %s", model_hash[:12], exc)
            return None


# --- one handler per working state -------------------------------------------------------------
def _downloading(m: UpdateMachine, wanted: str | None) -> Step:
    target = m.record.target_hash
    if wanted and wanted != target:
        return Step(E.ABORT, f"the server now names {wanted[:12]}")
    have = m._working or m._base()
    if have.model_hash == target:
        return Step(E.ABORT, "already on the target")
    try:
        m._downloaded = m.ctx.updater.download(have, target)
    except TransientError as exc:
        return Step(E.INTERRUPTED, f"download interrupted: {exc}")
    except (UpdateFailed, PermanentError, DownloadError) as exc:
        m.ctx.updater.stats.failures += 1
        return Step(E.FAILED, f"download refused: {exc}")
    m._working = have
    return Step(E.DOWNLOADED, f"artefact {m._downloaded.info.artefact_sha256[:12]} downloaded")


def _verifying(m: UpdateMachine, wanted: str | None) -> Step:
    got, have = m._downloaded, m._working
    if got is None or have is None:
        raise UpdateStateError("verifying without a downloaded artefact")
    m._downloaded = None
    try:
        reached = m.ctx.updater.verify(got, have)
    except UpdateFailed as exc:
        return Step(E.FAILED, str(exc))
    m._working = reached
    if reached.model_hash == m.record.target_hash:
        if m.record.rollbacks and reached.state is not None:
            # A version rolled back before the v2 model hash whose file gc has since deleted
            # kept its v1 name in the record (ModelStore could not re-key it); the migrated
            # server names it by v2. Recognise it by its v1 hash, and record the v2 name.
            v1 = tensors_hash(reached.state)
            if v1 != reached.model_hash and m.record.rejected(v1) is not None:
                m.record = m.record.rekeyed({v1: reached.model_hash})  # persisted by _fire
                m._working = None
                return Step(E.FAILED, f"model {reached.model_hash[:12]} was rolled back here (as "
                                      f"{v1[:12]}, its v1 hash); it is not retried")
        return Step(E.VERIFIED, f"model {reached.model_hash[:12]} verified")
    m._chain.append(have.model_hash)
    if reached.model_hash in m._chain or len(m._chain) >= MAX_CHAIN:
        return Step(E.FAILED, f"update path to {m.record.target_hash[:12]} loops or is too long")
    return Step(E.MORE, f"reached intermediate model {reached.model_hash[:12]}")


def _installing(m: UpdateMachine, wanted: str | None) -> Step:
    w = m._working
    if w is None or w.arch is None or w.state is None:
        raise UpdateStateError("installing without a verified model")
    try:
        m.ctx.store.install(w.arch, w.state, expected_hash=w.model_hash)
    except (ModelStoreError, OSError) as exc:  # refused or disk trouble: nothing was switched
        m.ctx.updater.stats.failures += 1
        return Step(E.FAILED, f"install refused: {exc}")
    m._working = None
    try:
        m.ctx.runner.load(w.arch, w.state, w.model_hash)
    except Exception as exc:  # noqa: BLE001 - any load failure means: not this model
        return Step(E.REJECTED, f"the new model fails to load: {exc}")
    m.ctx.updater.stats.artefacts_installed += 1
    return Step(E.INSTALLED, "installed and serving; on probation")


def _probation(m: UpdateMachine, wanted: str | None) -> Step:
    rec = m.record
    new = m.ctx.store.load(rec.target_hash)  # raises if it went bad: REJECTED
    verdict = judge(new, m._load(rec.previous_hash), m.ctx.local_data, m.ctx.probation)
    scores = verdict.scores
    for h, acc in ((rec.target_hash, scores.new_accuracy), (rec.previous_hash, scores.old_accuracy)):
        if h and acc is not None:
            m.scores[h] = acc
    return Step(E.PASSED if verdict.passed else E.REJECTED, verdict.reason, scores)


def _rolling_back(m: UpdateMachine, wanted: str | None) -> Step:
    rec = m.record
    report = rec.rejected(rec.target_hash)  # recorded on entering this state
    reason = report.reason if report is not None else rec.reason
    if not rec.previous_hash:
        return Step(E.FAILED, f"{reason}; no previous model to roll back to")
    try:
        old = m.ctx.store.activate(rec.previous_hash)
        m.ctx.runner.load(old.arch, old.state, old.model_hash)
    except ModelStoreError as exc:
        return Step(E.FAILED, f"{reason}; rolling back failed: {exc}")
    return Step(E.ROLLED_BACK, reason)


_HANDLERS: dict[State, Callable[[UpdateMachine, str | None], Step]] = {
    S.DOWNLOADING: _downloading,
    S.VERIFYING: _verifying,
    S.INSTALLING: _installing,
    S.PROBATION: _probation,
    S.ROLLING_BACK: _rolling_back,
}
assert set(_HANDLERS) == WORKING
