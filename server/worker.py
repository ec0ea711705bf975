"""The round worker: claims queued rounds and runs them outside any request handler."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from server.db.engine import transaction
from server.db.models import Round
from server.domain import rounds as R
from server.domain.devices import resolve_cohort
from server.domain.samples import SampleCache, load_labelled
from server.domain.versions import add_artefact, latest_version, load_state, publish_version
from server.notifier import Notifier
from server.settings import ServerSettings
from server.store.blobs import BlobStore
from server.training.carry_store import decode_carry, encode_carry
from server.training.policy import RoundInputs, RoundOutcome
from server.training.registry import get_policy
from shared.artefacts import SEED_MODEL_ENCODING, encode_seed_model

log = logging.getLogger(__name__)
_PROGRESS_DB_INTERVAL_S = 1.0


class RoundWorker:
    def __init__(
        self,
        settings: ServerSettings,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        *,
        rounds_wakeup: Notifier,
        targets_changed: Notifier,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.blobs = blobs
        self.cache = SampleCache(blobs)
        self.rounds_wakeup = rounds_wakeup
        self.targets_changed = targets_changed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-worker", daemon=True)
        # Policy state carried across rounds (DPU's re-init bookkeeping, residuals). Persisted
        # with each version's metrics where it must survive restarts.
        self.carry: dict[str, Any] = {}

    def start(self) -> None:
        self._load_carry()
        self._thread.start()

    def _save_carry(self, method: str) -> str | None:
        carry = self.carry.get(method) or {}
        if not any(v is not None and v != {} for v in carry.values()):
            return None
        try:
            return self.blobs.put(encode_carry(carry))
        except Exception:  # noqa: BLE001 - losing the carry costs accuracy, never the round
            log.exception("could not persist the %s policy state", method)
            return None

    def _load_carry(self) -> None:
        """Reload each method's newest carried state (shadow chain, residual) after a restart."""
        with transaction(self.factory) as s:
            rounds = s.scalars(select(Round).where(Round.status.in_([R.DONE, R.SKIPPED]))
                               .order_by(Round.finished_at.desc())).all()
            latest = {}
            for rnd in rounds:
                sha = (rnd.metrics or {}).get("carry_sha256")
                if sha and rnd.method not in latest:
                    latest[rnd.method] = sha
        for method, sha in latest.items():
            try:
                self.carry[method] = decode_carry(self.blobs.get(sha))
                log.info("restored %s policy state from %s", method, sha[:12])
            except Exception:  # noqa: BLE001
                log.exception("could not restore the %s policy state %s; starting without it", method, sha[:12])

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.rounds_wakeup.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        seen = self.rounds_wakeup.generation
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self.run_next():
                    pass
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad round
                log.exception("round worker iteration failed")
            seen = self.rounds_wakeup.wait(seen, self.settings.worker_poll_s)

    def run_next(self) -> bool:
        """Claim and run one queued round; False when there was none."""
        with transaction(self.factory) as s:
            round_id = R.claim_next(s)
        if round_id is None:
            return False
        try:
            self._run(round_id)
        except Exception as exc:  # noqa: BLE001
            log.exception("round %s failed", round_id)
            with transaction(self.factory) as s:
                rnd = s.get(Round, round_id)
                if rnd is not None and rnd.status not in R.TERMINAL:
                    R.transition(s, rnd, R.FAILED, reason=f"{type(exc).__name__}: {exc}")
        return True

    def _progress_fn(self, round_id: str, bar: tqdm):
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
                    if rnd is not None:
                        rnd.progress = min(0.99, step / max(total, 1))
                        rnd.progress_message = f"training step {step}/{total}" + "".join(
                            f", {k}={v:.4f}" for k, v in metrics.items())

        return progress

    def _run(self, round_id: str) -> None:
        t0 = time.monotonic()
        with transaction(self.factory) as s:
            rnd = R.get_round(s, round_id)
            policy = get_policy(rnd.method)
            params = policy.parse_params(rnd.params)
            base = latest_version(s)
            arch = self.settings.arch
            base_hash = base.model_hash if base else None
            base_state = load_state(s, self.blobs, base_hash)[1] if base_hash else None
            base_metrics = {**(base.metrics or {}), "method": base.method} if base else {}
            data = load_labelled(s, self.cache, arch, self.settings.val_fraction)
            rnd.base_model_hash = base_hash
            rnd.progress_message = f"training on {data.total} labelled samples"
        log.info("round %s: %s on %d labelled samples (base %s)", round_id, rnd.method, data.total,
                 (base_hash or "none")[:12])
        with tqdm(total=1, desc=f"round {round_id[:8]}", unit="step", leave=True, mininterval=1.0) as bar:
            outcome = policy.run(RoundInputs(
                arch=arch, base_state=base_state, base_hash=base_hash, data=data, params=params,
                base_metrics=base_metrics, progress=self._progress_fn(round_id, bar), carry=self.carry.setdefault(rnd.method, {}),
            ))
        self.carry[rnd.method] = outcome.carry or self.carry.get(rnd.method, {})
        carry_sha = self._save_carry(rnd.method)
        train_s = time.monotonic() - t0
        with transaction(self.factory) as s:
            rnd = R.get_round(s, round_id)
            metrics = {**outcome.metrics, "train_seconds": round(train_s, 3)}
            if carry_sha:
                metrics["carry_sha256"] = carry_sha
            if outcome.state is None:
                rnd.metrics = metrics
                R.transition(s, rnd, R.SKIPPED, reason=outcome.skip_reason or "the policy shipped nothing")
                log.info("round %s skipped: %s", round_id, rnd.reason)
                return
            R.transition(s, rnd, R.PUBLISHING)
            rnd.progress_message = "publishing"
        self._publish(round_id, arch, base_hash, outcome, metrics, t0)

    def _publish(self, round_id: str, arch, base_hash: str | None, outcome: RoundOutcome, metrics: dict, t0: float) -> None:
        with transaction(self.factory) as s:
            rnd = R.get_round(s, round_id)
            devices = resolve_cohort(s, rnd.cohort)
            parent = base_hash
            if outcome.reinit_seed is not None and outcome.diff_base_state is not None:
                # Re-initialisation (DPU §5.4.2): the seeded weights are a version of their own,
                # reachable from any model through a ~200-byte seed artefact.
                seeded = publish_version(s, self.blobs, arch=arch, state=outcome.diff_base_state,
                                         parent_hash=base_hash, method="reinit", metrics={},
                                         round_id=round_id, reinit_seed=outcome.reinit_seed)
                add_artefact(s, self.blobs, encode_seed_model(arch, outcome.reinit_seed, seeded.model_hash),
                             encoding=SEED_MODEL_ENCODING, target_hash=seeded.model_hash)
                parent = seeded.model_hash
                metrics["reinit_version"] = seeded.number
            mv = publish_version(
                s, self.blobs, arch=arch, state=outcome.state, parent_hash=parent, method=rnd.method,
                metrics=metrics, round_id=round_id, reinit_seed=outcome.reinit_seed,
                fleet_default=bool(rnd.cohort.get("all")),
            )
            full_size = self.blobs.size(mv.full_artefact_sha256)
            metrics["full_model_bytes"] = full_size
            diff_base = outcome.diff_base_hash or base_hash
            if outcome.diff is not None and diff_base:
                art = add_artefact(s, self.blobs, outcome.diff, encoding=outcome.diff_encoding or "",
                                   target_hash=mv.model_hash, base_hash=diff_base)
                metrics["diff_bytes"] = art.size
            for dev in devices:
                dev.target_model_hash = mv.model_hash
            rnd.model_hash = mv.model_hash
            rnd.device_ids = [d.id for d in devices]
            metrics["publish_seconds"] = round(time.monotonic() - t0 - metrics.get("train_seconds", 0), 3)
            rnd.metrics = metrics
            mv.metrics = dict(metrics)
            rnd.progress_message = f"published version {mv.number}"
            R.transition(s, rnd, R.DONE)
        log.info("round %s done: version %s -> %d devices", round_id, mv.model_hash[:12], len(devices))
        self.targets_changed.notify()
