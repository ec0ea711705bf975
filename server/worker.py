"""The round worker: claims queued rounds and runs them outside any request handler.

Several workers (threads of the server, or ``edgeloop server worker`` processes) may share one
database. A round's life in transactions:

1. claim (``rounds.claim_next``): queued -> training, owned by this worker;
2. start: the cohort, its base version, its labelled data and the policy's carried state
   (with the generation read) for the round's lineage;
3. train, outside any transaction, while a heartbeat thread keeps the claim alive;
4. finish, in one transaction, only while the round is still this worker's: mark skipped, or
   publish the version(s), retarget the cohort and mark done; the carried state (which a
   skipping policy may advance too) is saved in that same transaction, conditional on the
   generation read at the start, so a round never ships a model whose state was not kept,
   and a round that fails or was taken from its worker keeps nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from server.db.engine import transaction
from server.db.models import Round
from server.domain import rounds as R
from server.domain.devices import resolve_cohort
from server.domain.lineage import base_version
from server.domain.samples import SampleCache, load_labelled
from server.domain.versions import (
    add_artefact,
    add_seed_artefact,
    load_state,
    lock_publishing,
    publish_version,
)
from server.events.base import MAX_DEVICE_IDS
from server.notifier import Notifier
from server.settings import ServerSettings
from server.store.blobs import BlobStore
from server.training import distributed, state_store
from server.training.da3 import backbone_version
from server.training.policy import PolicyState, RoundInputs, RoundOutcome, UpdatePolicy
from server.training.registry import get_policy
from shared.models import ArchSpec

log = logging.getLogger(__name__)
_PROGRESS_DB_INTERVAL_S = 1.0
_CLAIM_ATTEMPTS = 3


class RoundLostError(RuntimeError):
    """The round is no longer this worker's (failed as interrupted while it trained)."""


@dataclass
class _Started:
    """What the start transaction read for one round."""

    policy: UpdatePolicy
    inputs: RoundInputs
    lineage: str
    state_generation: int
    state_note: str


class RoundWorker:
    def __init__(
        self,
        settings: ServerSettings,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        *,
        rounds_wakeup: Notifier,
        targets_changed: Notifier,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.blobs = blobs
        self.cache = SampleCache(blobs)
        self.rounds_wakeup = rounds_wakeup
        self.targets_changed = targets_changed
        self.worker_id = worker_id or R.new_worker_id()
        R.set_worker_live(self.worker_id, True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-worker", daemon=True)
        self._last_reap = 0.0
        self._current: str | None = None  # the round in hand

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the round in hand within ``timeout``, else fail it (this process is going)."""
        self._stop.set()
        self.rounds_wakeup.deliver()  # wakes this worker's loop only, not every worker on the bus
        if self._thread.is_alive():
            self._thread.join(timeout)
        current = self._current
        if self._thread.is_alive() and current is not None:
            with transaction(self.factory) as s:
                if R.heartbeat(s, current, self.worker_id):  # still ours, and held until the commit
                    R.transition(s, R.get_round(s, current, for_update=True), R.FAILED,
                                 reason="interrupted: its worker was stopped mid-round")
        R.set_worker_live(self.worker_id, False)

    def _loop(self) -> None:
        seen = self.rounds_wakeup.generation
        while not self._stop.is_set():
            try:
                self._reap_interrupted()
                while not self._stop.is_set() and self.run_next():
                    pass
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad round
                log.exception("round worker iteration failed")
            seen = self.rounds_wakeup.wait(seen, self.settings.worker_poll_s)

    def _reap_interrupted(self) -> None:
        """Fail rounds whose worker died, so their lineage is not blocked forever."""
        now = time.monotonic()
        if now - self._last_reap < self.settings.worker_heartbeat_s:
            return
        self._last_reap = now
        with transaction(self.factory) as s:
            n = R.fail_interrupted(s, stale_after_s=self.settings.worker_stale_s)
        if n:
            log.warning("failed %d rounds whose worker is gone", n)

    def _claim(self) -> str | None:
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                with transaction(self.factory) as s:
                    return R.claim_next(s, worker_id=self.worker_id)
            except IntegrityError:  # another worker claimed a round of that lineage first
                continue
        return None

    def run_next(self) -> bool:
        """Claim and run one queued round; False when there was none."""
        round_id = self._claim()
        if round_id is None:
            return False
        self._current = round_id
        try:
            with self._heartbeat(round_id):
                self._run(round_id)
        except RoundLostError as exc:  # failed by someone else meanwhile: its reason stands
            log.warning("%s", exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("round %s failed", round_id)
            with transaction(self.factory) as s:
                if R.heartbeat(s, round_id, self.worker_id):  # still ours, and held until the commit
                    R.transition(s, R.get_round(s, round_id, for_update=True), R.FAILED,
                                 reason=f"{type(exc).__name__}: {exc}")
        finally:
            self._current = None
        return True

    @contextmanager
    def _heartbeat(self, round_id: str) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.worker_heartbeat_s):
                try:
                    with transaction(self.factory) as s:
                        if not R.heartbeat(s, round_id, self.worker_id):
                            log.warning("round %s is no longer ours; its result will be refused", round_id)
                            return
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                    log.exception("heartbeat for round %s failed", round_id)

        t = threading.Thread(target=beat, name=f"heartbeat-{round_id[:8]}", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join(5)

    def _progress_fn(self, round_id: str, bar: tqdm):  # type: ignore[no-untyped-def]
        last = [0.0]

        def progress(step: int, total: int, metrics: dict[str, float]) -> None:
            if bar.total != total:
                bar.total = total
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            bar.update(step - bar.n)  # redraws at most once per mininterval
            now = time.monotonic()
            if now - last[0] >= _PROGRESS_DB_INTERVAL_S or step == total:
                last[0] = now
                with transaction(self.factory) as s:
                    rnd = s.get(Round, round_id)
                    if rnd is not None and rnd.status == R.TRAINING:
                        rnd.progress = min(0.99, step / max(total, 1))
                        rnd.progress_message = f"training step {step}/{total}" + "".join(
                            f", {k}={v:.4f}" for k, v in metrics.items())

        return progress

    def _start(self, s: Session, round_id: str, bar: tqdm) -> _Started:
        """Everything the round trains from, read in one transaction."""
        rnd = R.get_round(s, round_id)
        policy = get_policy(rnd.method)
        params = policy.parse_params(rnd.params)
        arch = self.settings.arch
        devices = resolve_cohort(s, rnd.cohort)
        base = base_version(s, devices, rnd.lineage)
        if base is not None and policy.name != "da3":  # other methods train the fleet backbone
            base = backbone_version(s, base)
        base_hash = base.model_hash if base else None
        base_arch, base_state = load_state(s, self.blobs, base_hash) if base_hash else (None, None)
        state: PolicyState | None = None
        generation, note = 0, ""
        if policy.State is not None:
            state, generation, note = state_store.load_state(s, self.blobs, rnd.lineage, rnd.method, policy.State)
            if note:
                log.warning("round %s: %s", round_id, note)
        # Cohort "all" trains on every sample, also those of since-revoked devices, as before.
        scope_all = rnd.data_scope == "all" or bool(rnd.cohort.get("all"))
        data = load_labelled(s, self.cache, arch, self.settings.val_fraction,
                             device_ids=None if scope_all else [d.id for d in devices])
        rnd.base_model_hash = base_hash
        rnd.progress_message = f"training on {data.total} labelled samples"
        log.info("round %s: %s for %s on %d labelled samples (base %s, state generation %d)", round_id,
                 rnd.method, rnd.lineage, data.total, (base_hash or "none")[:12], generation)
        inputs = RoundInputs(
            arch=arch, base_state=base_state, base_hash=base_hash, base_method=base.method if base else None,
            data=data, params=params, progress=self._progress_fn(round_id, bar), state=state,
            base_arch=base_arch,
        )
        return _Started(policy, inputs, rnd.lineage, generation, note)

    def _own(self, s: Session, round_id: str, status: str) -> Round:
        """The round, held for this transaction, if it is still this worker's and in ``status``."""
        owned = R.heartbeat(s, round_id, self.worker_id, status=status)
        rnd = R.get_round(s, round_id, for_update=True)
        if not owned:
            raise RoundLostError(f"round {round_id} is {rnd.status} (worker {rnd.worker_id or '?'}); "
                                 "this worker's result is discarded")
        return rnd

    def _save_state(self, s: Session, rnd: Round, started: _Started, outcome: RoundOutcome,
                    metrics: dict[str, Any]) -> str | None:
        """Save the carried state in the finishing transaction; returns a blob to collect."""
        if started.policy.State is None:
            return None
        saved = state_store.save_state(s, self.blobs, started.lineage, rnd.method, outcome.state,
                                       expected_generation=started.state_generation, round_id=rnd.id)
        metrics["state_generation"] = saved.generation
        return saved.superseded

    def _collect(self, sha: str | None) -> None:
        if sha:
            with transaction(self.factory) as s:
                state_store.collect_garbage(s, self.blobs, [sha])

    def _train(self, started: _Started) -> RoundOutcome:
        """In this process, or (a large enough `full` round, distributed_nproc_per_node > 1)
        with DDP ranks under torchrun (server/training/distributed.py)."""
        nproc = distributed.nproc_for(self.settings, started.policy, started.inputs)
        if nproc <= 1:
            return started.policy.run(started.inputs)
        log.info("training with %d DDP processes", nproc)
        return distributed.train_full_distributed(
            started.inputs, nproc=nproc, jobs_dir=self.settings.data_dir / "jobs",
            torchrun_args=self.settings.distributed_torchrun_args)

    def _run(self, round_id: str) -> None:
        t0 = time.monotonic()
        with tqdm(total=1, desc=f"round {round_id[:8]}", unit="step", leave=True, mininterval=1.0) as bar:
            with transaction(self.factory) as s:
                started = self._start(s, round_id, bar)
            outcome = self._train(started)
        metrics = {**outcome.metrics, "train_seconds": round(time.monotonic() - t0, 3)}
        if started.state_note:
            metrics["state_note"] = started.state_note
        if outcome.model is None:
            with transaction(self.factory) as s:
                rnd = self._own(s, round_id, R.TRAINING)
                garbage = self._save_state(s, rnd, started, outcome, metrics)
                rnd.metrics = metrics
                R.transition(s, rnd, R.SKIPPED, reason=outcome.skip_reason or "the policy shipped nothing")
                log.info("round %s skipped: %s", round_id, rnd.reason)
            self._collect(garbage)
            return
        with transaction(self.factory) as s:
            rnd = self._own(s, round_id, R.TRAINING)
            R.transition(s, rnd, R.PUBLISHING)
            rnd.progress_message = "publishing"
        self._publish(round_id, started, outcome, metrics, t0)

    def _publish(self, round_id: str, started: _Started, outcome: RoundOutcome, metrics: dict, t0: float) -> None:
        arch: ArchSpec = started.inputs.arch
        base_hash = started.inputs.base_hash
        assert outcome.model is not None
        with transaction(self.factory) as s:
            rnd = self._own(s, round_id, R.PUBLISHING)
            lock_publishing(s)  # before any row other publishers also write (devices, artefacts)
            devices = resolve_cohort(s, rnd.cohort)
            fleet_default = bool(rnd.cohort.get("all"))
            parent = base_hash
            if outcome.reinit_seed is not None and outcome.diff_base_state is not None:
                # Re-initialisation (DPU §5.4.2): the seeded weights are a version of their own,
                # reachable from any model through a ~200-byte seed artefact.
                seeded = publish_version(s, self.blobs, arch=arch, state=outcome.diff_base_state,
                                         parent_hash=base_hash, method="reinit", metrics={},
                                         round_id=round_id, reinit_seed=outcome.reinit_seed, lineage=rnd.lineage)
                add_seed_artefact(s, self.blobs, arch, outcome.reinit_seed, seeded.model_hash)
                parent = seeded.model_hash
                metrics["reinit_version"] = seeded.number
            mv = publish_version(
                s, self.blobs, arch=outcome.arch or arch, state=outcome.model, parent_hash=parent, method=rnd.method,
                metrics=metrics, round_id=round_id, reinit_seed=outcome.reinit_seed,
                fleet_default=fleet_default, lineage=rnd.lineage,
            )
            metrics["full_model_bytes"] = self.blobs.size(mv.full_artefact_sha256)
            diff_base = outcome.diff_base_hash or base_hash
            if outcome.diff is not None and diff_base:
                art = add_artefact(s, self.blobs, outcome.diff, encoding=outcome.diff_encoding or "",
                                   target_hash=mv.model_hash, base_hash=diff_base)
                metrics["diff_bytes"] = art.size
            garbage = self._save_state(s, rnd, started, outcome, metrics)
            for dev in devices:
                dev.target_model_hash = mv.model_hash
            rnd.model_hash = mv.model_hash
            rnd.device_ids = ids = [d.id for d in devices]
            metrics["publish_seconds"] = round(time.monotonic() - t0 - metrics.get("train_seconds", 0), 3)
            rnd.metrics = metrics
            mv.metrics = dict(metrics)
            rnd.progress_message = f"published version {mv.number}"
            R.transition(s, rnd, R.DONE)
        self._collect(garbage)
        log.info("round %s done: version %s (%s) -> %d devices", round_id, mv.model_hash[:12], rnd.lineage,
                 len(devices))
        # Contract (server/context.py): at most MAX_DEVICE_IDS ids, else None ("any device").
        self.targets_changed.notify({"round_id": round_id, "device_ids": ids if len(ids) <= MAX_DEVICE_IDS else None})
