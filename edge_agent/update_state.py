"""The update lifecycle as data: states, a closed event set, one transition table, a resume
table, and the record persisted before every state is acted on.

Modelled on Mender's daemon (``state_machine.cpp``: one ``AddTransition`` per line; a
``LoadStateFromDb`` resume table; a versioned state-data schema; a counter that turns crash
loops into ``StateLoopDetected``). What each state *does* lives in
:mod:`edge_agent.update_machine`; this module only says where each event leads::

    idle/committed/rolled_back/failed --START--> downloading --DOWNLOADED--> verifying
    verifying --MORE (next diff of a chain)--> downloading
    verifying --VERIFIED--> installing --INSTALLED--> probation --PASSED--> committed
    installing/probation --REJECTED--> rolling_back --ROLLED_BACK--> rolled_back
    downloading/verifying/installing --FAILED--> failed   (nothing was switched)

``committed``, ``rolled_back`` and ``failed`` are resting states like ``idle``: the machine
stays there (and heartbeats say so) until the next target STARTs it again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

from edge_agent.download import atomic_write

log = logging.getLogger(__name__)

SCHEMA = 1  # bump when the record's fields change meaning (a file of another schema is set aside)
MAX_ROLLBACKS = 32  # rollback reports kept (they are also the never-retry list)
MAX_RESUMES = 3  # start-ups during one update before it counts as a crash loop
MAX_REASON = 1024  # characters; the server refuses longer rollback reasons


class State(str, Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(str, Enum):
    START = "start"  # a new target to reach
    DOWNLOADED = "downloaded"  # one artefact's bytes are all on disk
    INTERRUPTED = "interrupted"  # cannot finish now (link dropped, disk error): resume later
    ABORT = "abort"  # the server now names another target
    MORE = "more"  # an intermediate diff of a chain verified; fetch the next one
    VERIFIED = "verified"  # the target model is decoded and every hash checked
    INSTALLED = "installed"  # pointer switched, the runner serves the new model
    PASSED = "passed"  # probation: not worse than the old model (or nothing to compare)
    REJECTED = "rejected"  # the new model fails to load/run, or is worse than the old one
    ROLLED_BACK = "rolled_back"  # the old model serves again
    FAILED = "failed"  # refused before anything was switched (or nothing to roll back to)
    LOOP = "loop"  # restarted more than MAX_RESUMES times during one update


S, E = State, Event
# (state, event) -> next state. Anything not listed is a bug and raises IllegalTransition.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE,         E.START):       S.DOWNLOADING,
    (S.COMMITTED,    E.START):       S.DOWNLOADING,
    (S.ROLLED_BACK,  E.START):       S.DOWNLOADING,
    (S.FAILED,       E.START):       S.DOWNLOADING,
    (S.DOWNLOADING,  E.DOWNLOADED):  S.VERIFYING,
    (S.DOWNLOADING,  E.INTERRUPTED): S.DOWNLOADING,   # suspend; the part file resumes it
    (S.DOWNLOADING,  E.ABORT):       S.IDLE,          # nothing installed yet: just drop it
    (S.DOWNLOADING,  E.FAILED):      S.FAILED,
    (S.DOWNLOADING,  E.LOOP):        S.FAILED,
    (S.VERIFYING,    E.MORE):        S.DOWNLOADING,
    (S.VERIFYING,    E.VERIFIED):    S.INSTALLING,
    (S.VERIFYING,    E.FAILED):      S.FAILED,
    (S.INSTALLING,   E.INSTALLED):   S.PROBATION,
    (S.INSTALLING,   E.FAILED):      S.FAILED,        # the store refused: pointer not switched
    (S.INSTALLING,   E.REJECTED):    S.ROLLING_BACK,  # switched, but the model will not load
    (S.PROBATION,    E.PASSED):      S.COMMITTED,
    (S.PROBATION,    E.REJECTED):    S.ROLLING_BACK,
    (S.PROBATION,    E.LOOP):        S.ROLLING_BACK,  # it keeps killing the agent: take it out
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.INTERRUPTED): S.ROLLING_BACK,  # could not finish now: retried later
    (S.ROLLING_BACK, E.FAILED):      S.FAILED,        # no valid previous model to return to
    (S.ROLLING_BACK, E.LOOP):        S.FAILED,
}

RESTING = frozenset({S.IDLE, S.COMMITTED, S.ROLLED_BACK, S.FAILED})
WORKING = frozenset(State) - RESTING

# The event a state's handler stands for when it raises unexpectedly: before the pointer
# switch the old model is untouched (failed); after it, the new one must go (roll back); a
# rollback that raises is retried, since giving up would leave the rejected model serving.
ON_ERROR: dict[State, Event] = {
    S.DOWNLOADING: E.FAILED,
    S.VERIFYING: E.FAILED,
    S.INSTALLING: E.REJECTED,
    S.PROBATION: E.REJECTED,
    S.ROLLING_BACK: E.INTERRUPTED,
}

# Start-up after a crash: (persisted state, "the model store's current model is the record's
# target") -> the state to re-enter. Resting states stay; in-memory work is redone.
RESUME: dict[tuple[State, bool], State] = {
    (S.IDLE,         False): S.IDLE,
    (S.IDLE,         True):  S.IDLE,
    (S.DOWNLOADING,  False): S.DOWNLOADING,   # the part file resumes the download
    (S.DOWNLOADING,  True):  S.DOWNLOADING,   # (a chain's end already active: it finishes fast)
    (S.VERIFYING,    False): S.DOWNLOADING,   # the decoded model lived in memory: fetch again
    (S.VERIFYING,    True):  S.DOWNLOADING,
    (S.INSTALLING,   False): S.FAILED,        # died before the switch: the old model is current
    (S.INSTALLING,   True):  S.PROBATION,     # switched: judge the new model now
    (S.PROBATION,    False): S.ROLLING_BACK,  # the store fell back from it: it is not usable
    (S.PROBATION,    True):  S.PROBATION,
    (S.ROLLING_BACK, False): S.ROLLING_BACK,  # idempotent: activate the previous model again
    (S.ROLLING_BACK, True):  S.ROLLING_BACK,
    (S.COMMITTED,    False): S.COMMITTED,
    (S.COMMITTED,    True):  S.COMMITTED,
    (S.ROLLED_BACK,  False): S.ROLLED_BACK,
    (S.ROLLED_BACK,  True):  S.ROLLED_BACK,
    (S.FAILED,       False): S.FAILED,
    (S.FAILED,       True):  S.FAILED,
}


class UpdateStateError(ValueError):
    """The update state file or a transition is invalid."""


class IllegalTransition(UpdateStateError):
    """An event that the current state does not accept: a bug in the caller."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state.value!r} on {event.value!r}")
        self.state, self.event = state, event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def now_ms() -> int:
    return int(time.time() * 1000)


def short(reason: str) -> str:
    """A reason cut to :data:`MAX_REASON` characters (exception texts can be long)."""
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


@dataclass(frozen=True)
class RollbackReport:
    """One rolled-back version: reported in heartbeats, and never installed again."""

    model_hash: str
    reason: str
    at_ms: int


@dataclass(frozen=True)
class Probation:
    """How the new model scored against the old one on the same local labelled inputs."""

    samples: int
    new_accuracy: float | None
    old_accuracy: float | None


@dataclass(frozen=True)
class UpdateRecord:
    state: State = S.IDLE
    target_hash: str = ""  # the version being installed (or last installed / rejected)
    previous_hash: str = ""  # the model that served when it started: the rollback target
    reason: str = ""  # why the last transition happened (shown to the operator)
    updated_at_ms: int = 0
    resumes: int = 0  # start-ups during this update (crash-loop guard; fresh for a rollback)
    probation: Probation | None = None
    rollbacks: tuple[RollbackReport, ...] = field(default_factory=tuple)

    def rejected(self, model_hash: str) -> RollbackReport | None:
        return next((r for r in self.rollbacks if r.model_hash == model_hash), None)

    def with_rollback(self, report: RollbackReport) -> UpdateRecord:
        kept = tuple(r for r in self.rollbacks if r.model_hash != report.model_hash)
        return replace(self, rollbacks=(kept + (report,))[-MAX_ROLLBACKS:])

    def rekeyed(self, mapping: Mapping[str, str]) -> UpdateRecord:
        """The record with v1 model hashes replaced by their v2 hashes (ModelStore.rekeyed);
        hashes not in ``mapping`` stay (a rejected model whose file is gone cannot be re-keyed)."""
        def tr(h: str) -> str:
            return mapping.get(h, h)

        return replace(self, target_hash=tr(self.target_hash), previous_hash=tr(self.previous_hash),
                       rollbacks=tuple(replace(r, model_hash=tr(r.model_hash)) for r in self.rollbacks))

    def to_json(self) -> dict:
        data = asdict(self)
        data["state"] = self.state.value
        data["rollbacks"] = [asdict(r) for r in self.rollbacks]
        return {"schema": SCHEMA, **data}


def _parse(data: object) -> UpdateRecord:
    if not isinstance(data, dict):
        raise UpdateStateError("not a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise UpdateStateError(f"schema {schema!r} is not {SCHEMA}")
    try:
        state = State(data["state"])
        prob = data.get("probation")
        return UpdateRecord(
            state=state, target_hash=str(data.get("target_hash", "")),
            previous_hash=str(data.get("previous_hash", "")), reason=str(data.get("reason", "")),
            updated_at_ms=int(data.get("updated_at_ms", 0)), resumes=int(data.get("resumes", 0)),
            probation=Probation(int(prob["samples"]), prob.get("new_accuracy"), prob.get("old_accuracy"))
            if prob else None,
            rollbacks=tuple(RollbackReport(str(r["model_hash"]), str(r["reason"]), int(r["at_ms"]))
                            for r in data.get("rollbacks", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateStateError(f"bad field: {exc}") from exc


class UpdateStateFile:
    """``update_state.json``: written atomically (temp file, fsync, rename, directory fsync).

    An unreadable file is moved aside as ``<name>.corrupt-<unix time>`` and the record
    starts idle: the model store's pointer still says which model is current, so nothing
    unsafe follows from forgetting an update in flight.
    """

    def __init__(self, path: Path, rekey: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.rekey = dict(rekey or {})  # v1 -> v2 model hashes (ModelStore.rekeyed)

    def load(self) -> UpdateRecord:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return UpdateRecord()
        try:
            record = _parse(json.loads(raw))
            if self.rekey and (upgraded := record.rekeyed(self.rekey)) != record:
                self.save(upgraded)  # durable, so the translation happens once
                record = upgraded
            return record
        except (UnicodeDecodeError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("update state %s is unreadable (%s); moved aside to %s", self.path, exc, aside)
            self.path.rename(aside)
            return UpdateRecord()

    def save(self, record: UpdateRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(record.to_json(), sort_keys=True).encode())
