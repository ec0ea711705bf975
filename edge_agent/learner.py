"""The learner service: derives, checks, stores and serves this device's personal model.

One thread. It (re-)derives the personal model when the committed fleet base changes (the
supervisor calls :meth:`LearnerService.base_changed` after a commit or a rollback) and when
``learner_retrain_every`` new labelled samples reached the :class:`LocalDataset`, provided at
least ``learner_min_samples`` are stored. A derivation trains on the local data minus a held-out
part, and the personal model serves only if its accuracy there is not below the base's (both
are reported); otherwise the base serves alone. A served personal model is stored
(:class:`PersonalStore`) so a restart serves it again after re-checking it on the held-out
part, and personal models of other bases are deleted. Nothing here uploads anything: the
personal model and the local data stay on the device (docs/learner.md).

The service derives only for the base the supervisor last declared committed: a model on
probation is scored as the fleet shipped it, never with a personal head on top.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_agent.local_data import LocalDataset
from edge_agent.personal_store import PersonalStore
from edge_agent.runner import ModelRunner, PersonalModelError
from edge_agent.settings import AgentSettings
from shared.models import ArchSpec, build_model
from shared.personal import (
    Learner,
    LearnerConfig,
    LearnerError,
    LearnerRefused,
    PersonalArtefact,
    encode_personal,
    make_learner,
)
from shared.tensors import StateDict
from shared.training import accuracy

log = logging.getLogger(__name__)

_SPLIT_SEED = 0  # fixed: the same local data always splits the same way


def learner_config(settings: AgentSettings, learner: Learner) -> LearnerConfig:
    """The learner's config from the agent settings: the ``learner_*`` values its config type
    has a field for (``epochs``, ``lr``), its own defaults for the rest."""
    values = {"epochs": settings.learner_epochs, "lr": settings.learner_lr}
    fields = {f.name for f in dataclasses.fields(learner.config_type)}
    return learner.parse_config({k: v for k, v in values.items() if k in fields})


def split_holdout(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, holdout)`` indices: a seeded permutation, at least one of each."""
    if n < 2:
        raise LearnerError(f"need at least 2 samples to hold some out, got {n}")
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    k = min(n - 1, max(1, math.ceil(n * fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


def served_accuracy(arch: ArchSpec, state: StateDict, x: np.ndarray, y: np.ndarray) -> float:
    model = build_model(arch)
    model.load_state_dict(state)
    return accuracy(model, x, y)


class LearnerService:
    """``start()`` / ``stop()`` / ``base_changed()`` for the supervisor, ``status()`` for the
    status page, ``metrics()`` for heartbeats. With ``learner = "none"`` it does nothing."""

    def __init__(self, settings: AgentSettings, runner: ModelRunner, store: PersonalStore,
                 local_data: LocalDataset, *,
                 config_overrides: Callable[[], Mapping[str, Any]] | None = None,
                 min_samples: int | None = None, compare_base: bool = True) -> None:
        """``local_data`` is what the learner learns from: the local dataset, or any object
        with ``added``, ``len`` and ``recent(n)`` (the pmeta learner's support set,
        ``edge_agent.few_shot``). ``config_overrides()`` gives config fields read live at each
        step (the memory budget, the support set's classes): a changed config re-derives, as a
        new base does. ``min_samples`` replaces ``learner_min_samples``. ``compare_base=False``
        serves the personal model whatever the base scores (pmeta: the base cannot name the
        support set's classes, so its held-out score is chance, not a reference)."""
        self.settings, self.runner, self.store, self.local = settings, runner, store, local_data
        self.learner: Learner | None = None
        self.config: LearnerConfig | None = None
        self._overrides = config_overrides
        self._min_samples = min_samples if min_samples is not None else settings.learner_min_samples
        self._compare_base = compare_base
        if settings.learner != "none":
            self.learner = make_learner(settings.learner)
            self.config = learner_config(settings, self.learner)
        self._settings_config = self.config
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake = False
        self._committed: str | None = None  # None: whatever the runner has (no supervisor yet)
        self._outcome_base: str | None = None  # the base the last outcome was for
        self._served: str = ""  # the personal hash that outcome put on the runner ("" none)
        self._mark = 0  # local_data.added when the last derivation read the data
        self._outcomes = 0  # derivations + loads + refusals + failures (tests wait on it)
        self._info: dict[str, Any] = {"state": "idle", "reason": None}
        self._counts = {"derivations": 0, "loaded": 0, "failures": 0}

    # -- supervisor interface ----------------------------------------------------------------

    def start(self) -> None:
        """Start the thread. Unless :meth:`base_changed` named the committed base already, the
        runner's base at this moment is taken as committed."""
        if self.learner is None or self._thread is not None:
            return
        with self._cond:
            self._stopping = False
            base = self.runner.base()
            if self._committed is None and base is not None:
                self._committed = base[2]
            self._wake = True
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to stop; a derivation under way finishes first (a few epochs)."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout)
        self._thread = None

    def base_changed(self, model_hash: str | None = None) -> None:
        """``model_hash`` (None: the runner's base) is now the committed fleet model; ``""``
        says nothing is committed yet (a new device's first model is still on probation), so
        nothing is derived until a commit is declared."""
        with self._cond:
            base = self.runner.base()
            if model_hash is None:
                model_hash = base[2] if base is not None else ""
            self._committed = model_hash
            self._outcome_base = None  # re-decide even for a base seen before (rollback)
            self._wake = True
            self._cond.notify_all()

    def reconsider(self) -> None:
        """Decide again for the committed base, as after a base change (the da3 learner's
        domain switched: serve that domain's stored adaptor or adapt one)."""
        with self._cond:
            self._outcome_base = None
            self._wake = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Check for new local samples now rather than at the next poll."""
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def wait_outcomes(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``count`` outcomes (derived, loaded, refused or failed) happened."""
        with self._cond:
            return self._cond.wait_for(lambda: self._outcomes >= count, timeout)

    @property
    def outcomes(self) -> int:
        with self._cond:
            return self._outcomes

    def status(self) -> dict[str, Any]:
        if self.learner is None:
            return {"learner": "none", "state": "disabled"}
        with self._cond:
            info = dict(self._info)
            counts = dict(self._counts)
        return {"learner": self.learner.name, "config": self.config.to_dict() if self.config else None,
                **info, **counts, "personal_hash": self.runner.personal_hash or None,
                "local_samples": len(self.local)}

    def metrics(self) -> dict[str, float]:
        if self.learner is None:
            return {}
        with self._cond:
            info, counts = dict(self._info), dict(self._counts)
        out = {"learner_serving_personal": float(bool(self.runner.personal_hash)),
               **{f"learner_{k}": float(v) for k, v in counts.items()}}
        for key in ("base_accuracy", "personal_accuracy", "train_samples", "holdout_samples",
                    "duration_s"):
            if info.get(key) is not None:
                out[f"learner_{key}"] = float(info[key])
        for key, value in (info.get("meta") or {}).items():  # the learner's numbers (pmeta: memory)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"learner_{key}", float(value))
        return out

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._wake,
                                    timeout=self.settings.learner_poll_s)
                if self._stopping:
                    return
                self._wake = False
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - keep learning alive; report why
                log.exception("learner step failed")
                self._finish(None, state="failed", reason=f"{type(exc).__name__}: {exc}",
                             counter="failures")

    def _step(self) -> None:
        assert self.learner is not None and self.config is not None
        base = self.runner.base()
        if base is None:
            self._set(state="no_model", reason="no fleet model loaded")
            return
        arch, state, base_hash = base
        with self._cond:
            committed = self._committed
        if committed is not None and committed != base_hash:
            self._set(state="waiting_for_commit", reason=f"model {base_hash[:12]} is not committed")
            return
        # A reload of the runner (same base after a rollback, say) drops its personal model.
        new_base = self._refresh_config() or base_hash != self._outcome_base \
            or self.runner.personal_hash != self._served
        fresh = self.local.added - self._mark
        retrain = self.settings.learner_retrain_every
        if not new_base and not (retrain and fresh >= retrain):
            return
        if new_base and self._serve_stored(arch, state, base_hash):
            return
        if len(self.local) < self._min_samples:
            self._set(state="waiting_for_samples", base_hash=base_hash,
                      reason=f"{len(self.local)} of {self._min_samples} labelled local samples")
            return
        try:
            self._derive(arch, state, base_hash)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk; retry on the next trigger
            log.exception("deriving a personal model failed")
            self._mark = self.local.added
            self._finish(base_hash, state="failed", reason=f"{type(exc).__name__}: {exc}",
                         counter="failures")

    def _refresh_config(self) -> bool:
        """Apply ``config_overrides``; True if that changed the config."""
        if self._overrides is None or self.learner is None or self._settings_config is None:
            return False
        config = self.learner.parse_config({**self._settings_config.to_dict(), **self._overrides()})
        with self._cond:
            changed, self.config = config != self.config, config
        return changed

    def _local_data(self) -> tuple[np.ndarray, np.ndarray]:
        limit = self.settings.learner_max_samples or None
        return self.local.recent(limit)

    def _serve_stored(self, arch: ArchSpec, state: StateDict, base_hash: str) -> bool:
        """Serve a stored personal model for this base if it was made with this config and is
        not worse than the base on today's held-out data."""
        assert self.learner is not None and self.config is not None
        stored = self.store.load(base_hash, self.learner.name)
        if stored is None or stored.config != self.config.to_dict():
            return False
        served_arch = self.learner.served_arch(arch, stored.delta)
        try:
            served = self.learner.apply(arch, state, stored.delta)
        except LearnerError as exc:
            log.warning("stored personal model does not apply (%s); re-deriving", exc)
            self.store.delete(base_hash, self.learner.name)
            return False
        base_acc = personal_acc = None
        x, y = self._local_data()
        if len(x) >= 2 and tuple(x.shape[1:]) == arch.input_shape:
            _, hold = split_holdout(len(x), self.settings.learner_holdout)
            base_acc = served_accuracy(arch, state, x[hold], y[hold])
            personal_acc = served_accuracy(served_arch, served, x[hold], y[hold])
            if self._compare_base and personal_acc < base_acc:
                return False  # the world moved on: derive again from today's data
        if not self.runner.set_personal(base_hash, served, stored.personal_hash, arch=served_arch):
            return True  # another base arrived meanwhile; the next step handles it
        self._mark = self.local.added
        self.store.gc({base_hash})
        self._finish(base_hash, state="serving", reason="loaded from the personal store",
                     counter="loaded", base_accuracy=base_acc, personal_accuracy=personal_acc,
                     train_samples=stored.samples, stored_hash=stored.personal_hash,
                     meta=stored.delta.meta)
        return True

    def _derive(self, arch: ArchSpec, state: StateDict, base_hash: str) -> None:
        assert self.learner is not None and self.config is not None
        start = time.monotonic()
        mark = self.local.added
        x, y = self._local_data()
        try:
            if tuple(x.shape[1:]) != arch.input_shape:
                raise LearnerError(f"local inputs are {tuple(x.shape[1:])}, the model takes "
                                   f"{arch.input_shape}")
            train, hold = split_holdout(len(x), self.settings.learner_holdout)
            delta = self.learner.adapt(arch, state, x[train], y[train], self.config)
            served = self.learner.apply(arch, state, delta)
            served_arch = self.learner.served_arch(arch, delta)
        except LearnerRefused as exc:
            self._mark = mark
            self._finish(base_hash, state="refused", reason=exc.reason, counter="failures")
            return
        except LearnerError as exc:
            self._mark = mark
            self._finish(base_hash, state="failed", reason=str(exc), counter="failures")
            return
        base_acc = served_accuracy(arch, state, x[hold], y[hold])
        personal_acc = served_accuracy(served_arch, served, x[hold], y[hold])
        sizes = {"base_accuracy": base_acc, "personal_accuracy": personal_acc,
                 "train_samples": len(train), "holdout_samples": len(hold)}
        self._mark = mark
        if self._compare_base and personal_acc < base_acc:
            self.runner.clear_personal(base_hash)
            self.store.delete(base_hash, self.learner.name)
            self.store.gc({base_hash})
            self._finish(base_hash, state="base_better", counter="derivations",
                         reason="the personal model was less accurate on held-out local data",
                         duration_s=time.monotonic() - start, **sizes)
            return
        data, personal_hash = encode_personal(base_hash, self.learner.name, self.config.to_dict(),
                                              len(train), delta)
        artefact: PersonalArtefact = self.store.put(data)
        try:
            served_now = self.runner.set_personal(base_hash, served, personal_hash, arch=served_arch)
        except PersonalModelError as exc:
            self.store.delete(base_hash, self.learner.name)
            self._finish(base_hash, state="failed", reason=str(exc), counter="failures")
            return
        if not served_now:  # a new base was loaded while we trained: its turn is next
            log.info("base changed during derivation; dropping the result for %s", base_hash[:12])
            return
        self.store.gc({base_hash})
        delta_params = sum(t.numel() for t in delta.tensors.values())
        log.info("personal model %s on base %s: held-out accuracy %.3f (base %.3f)",
                 personal_hash[:12], base_hash[:12], personal_acc, base_acc)
        self._finish(base_hash, state="serving", reason=None, counter="derivations",
                     duration_s=time.monotonic() - start, stored_hash=artefact.personal_hash,
                     delta_params=delta_params, meta=delta.meta, **sizes)

    # -- bookkeeping -------------------------------------------------------------------------

    def _set(self, **info: Any) -> None:
        with self._cond:
            self._info.update(info)

    def _finish(self, base_hash: str | None, *, state: str, reason: str | None, counter: str,
                **info: Any) -> None:
        """Record one outcome and wake anyone waiting for it."""
        with self._cond:
            if base_hash is not None:
                self._outcome_base = base_hash
                self._served = str(info.get("stored_hash") or "") if state == "serving" else ""
            self._info = {"state": state, "reason": reason, "base_hash": base_hash,
                          "finished_at": time.time(), **info}
            self._counts[counter] += 1
            self._outcomes += 1
            self._cond.notify_all()

