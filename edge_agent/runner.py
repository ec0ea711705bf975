"""The model runner: owns the in-memory model the agent infers with.

A plain model runs as its torch module. A DRESS model (``arch.extra["dress"]``, thesis ch. 3)
runs through a :class:`~shared.dress.DressRunner` over DRESS-CSR tables rebuilt from the state
(``shared.dress.model_state.tables_from_state``, deterministic, so the device's tables equal
the server's); ``set_subnet(k)`` switches between its K nested subnets without copying a
weight (§3.3.4). A DRESS model that was never DRESS-trained (the server's version 0 has an
all-zero allocation) runs densely, with ``active_subnet == -1``.

Everything a new model needs is built before the lock is taken, and swapped in under it:
inference never sees a half-loaded model, and a failed build leaves the old model running.

A *personal model* (docs/learner.md) can be served on top of the base: ``set_personal``
installs the state a learner derived for one base hash, and predictions use it while that base
is loaded. ``state``, ``arch`` and ``model_hash`` stay the base's (the updater applies diffs to
them and heartbeats report the fleet version); loading another base drops the personal model
in the same swap. Personal models are served for plain models only: a DRESS model runs its
subnet tables, and adapting those is left to the families that need it (p-Meta, DA³).
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from shared.dress import DressError, DressRunner, DressTables
from shared.dress.kernels import KernelPlan
from shared.models import ArchSpec, build_model, families_of, inference_engine
from shared.tensors import to_model_input

log = logging.getLogger(__name__)


# Families whose models run as their plain module and whose learners adapt them (a p-Meta
# model's personal model is its adapted backbone and head; a DA³ model's, its domain adaptor
# over the same frozen backbone: docs/learner.md).
PERSONAL_FAMILIES = frozenset({"pmeta", "da3"})


class SubnetError(ValueError):
    """``set_subnet`` was given a subnet the loaded model does not have."""


class PersonalModelError(ValueError):
    """``set_personal`` was given a state the runner cannot serve (DRESS base, bad tensors)."""


@dataclass(frozen=True)
class Prediction:
    """One ``predict_timed`` call: results plus what produced them."""

    pred: np.ndarray
    conf: np.ndarray
    model_hash: str
    subnet: int  # -1: a plain (or not yet DRESS-trained) model
    forward_ms: float  # the model's forward alone, as shared.dress.measure_latency times it
    personal_hash: str = ""  # the personal model that produced it ("" : the base alone)


class ModelRunner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self._dress: DressRunner | None = None
        self.arch: ArchSpec | None = None
        self.model_hash = ""
        self.state: dict[str, torch.Tensor] | None = None
        self._personal: torch.nn.Module | None = None
        self.personal_hash = ""  # "" while the base alone serves

    @property
    def ready(self) -> bool:
        return self._model is not None or self._dress is not None

    @property
    def is_dress(self) -> bool:
        return self._dress is not None

    @property
    def tables(self) -> DressTables | None:
        """The DRESS-CSR tables of the running model (None: plain or untrained DRESS model)."""
        dress = self._dress
        return dress.tables if dress is not None else None

    @property
    def num_subnets(self) -> int:
        dress = self._dress
        return dress.num_subnets if dress is not None else 0

    @property
    def active_subnet(self) -> int:
        dress = self._dress
        return dress.subnet if dress is not None else -1

    def load(self, arch: ArchSpec, state: dict[str, torch.Tensor], model_hash: str,
             subnet: int | None = None) -> None:
        """Build the new model fully, then swap it in under the lock.

        A DRESS model starts on ``subnet`` if given, else on the subnet running now when the
        new model has it (the governor's choice survives an update until it re-profiles),
        else on the sparsest one (the cheapest, so a tight budget is not broken meanwhile).
        """
        model = build_model(arch)
        model.load_state_dict(state)  # validates every key and shape, DRESS buffers included
        model.eval()
        dress = None
        engine = inference_engine(arch, state)  # the model family's (shared/models/families.py)
        if isinstance(engine, DressRunner):
            k = subnet
            if k is None:
                current = self.active_subnet
                k = current if 0 <= current < engine.num_subnets else engine.num_subnets - 1
            engine.set_subnet(self._check_k(k, engine.num_subnets))
            dress, model = engine, None  # the tables hold every weight DRESS runs; drop the dense copy
        elif engine is not None:
            model = engine  # another family's engine serves in place of the plain module
        elif families_of(arch):  # e.g. a DRESS version 0: allocation still all zeros
            log.info("model %s runs densely: its model family has no engine for it yet", model_hash[:12])
        with self._lock:
            self._model, self._dress = model, dress
            self.arch, self.model_hash, self.state = arch, model_hash, state
            self._personal, self.personal_hash = None, ""  # it was derived for the old base

    def base(self) -> tuple[ArchSpec, dict[str, torch.Tensor], str] | None:
        """``(arch, state, model_hash)`` of the loaded base, read together (None: nothing)."""
        with self._lock:
            if self.arch is None or self.state is None:
                return None
            return self.arch, self.state, self.model_hash

    def set_personal(self, base_hash: str, served_state: dict[str, torch.Tensor],
                     personal_hash: str, arch: ArchSpec | None = None) -> bool:
        """Serve ``served_state`` (built as ``arch``, default the base's) while base
        ``base_hash`` is loaded. Returns False, changing nothing, if another base is loaded
        by now; raises :class:`PersonalModelError` for a DRESS base or a state that does not
        load. The module is built before the lock is taken, like :meth:`load`."""
        with self._lock:
            # No plain module: a family inference engine (DRESS tables) runs this base.
            current_arch, engine, current = self.arch, self._model is None, self.model_hash
        if base_hash != current or current_arch is None:
            return False
        if engine or any(v is not None for k, v in current_arch.extra.items() if k not in PERSONAL_FAMILIES):
            raise PersonalModelError("personal models are served for plain models only "
                                     f"(and the families {sorted(PERSONAL_FAMILIES)})")
        try:
            model = build_model(arch or current_arch)
            # assign=True: the personal module shares the base's unchanged tensors
            # (inference never writes them) instead of holding a second copy of the backbone.
            model.load_state_dict(served_state, assign=True)
        except (RuntimeError, ValueError) as exc:
            raise PersonalModelError(f"personal state does not load: {exc}") from exc
        model.eval()
        with self._lock:
            if self.model_hash != base_hash:
                return False
            self._personal, self.personal_hash = model, personal_hash
        log.info("serving personal model %s on base %s", personal_hash[:12], base_hash[:12])
        return True

    def clear_personal(self, base_hash: str | None = None) -> None:
        """Serve the base alone again (with ``base_hash``: only if that base is loaded)."""
        with self._lock:
            if base_hash is None or base_hash == self.model_hash:
                self._personal, self.personal_hash = None, ""

    @staticmethod
    def _check_k(k: object, num_subnets: int) -> int:
        if num_subnets == 0:
            raise SubnetError(f"cannot select subnet {k!r}: the running model has no DRESS subnets")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < num_subnets:
            raise SubnetError(f"subnet must be an int in [0, {num_subnets}), got {k!r}")
        return int(k)

    def set_kernels(self, plan: KernelPlan | None, model_hash: str | None = None) -> bool:
        """Install a per-layer kernel plan measured at profile time (shared.dress.kernels) on
        the DRESS runner; False (nothing changed) for a plain model or when another model than
        ``model_hash`` is loaded by now."""
        with self._lock:
            if self._dress is None or (model_hash is not None and model_hash != self.model_hash):
                return False
            try:
                self._dress.set_kernels(plan)
            except DressError:  # measured for other tables (a model swapped in meanwhile)
                return False
            return True

    def set_subnet(self, k: int, model_hash: str | None = None) -> bool:
        """Switch the DRESS subnet (views of the tables, no weight copy).

        With ``model_hash``, switches only while that model is loaded and returns False
        otherwise: a decision made for the previous model must not land on a new one. Raises
        :class:`SubnetError` for a plain model or an out-of-range ``k``. Waits at most for one
        in-flight ``predict`` (DressRunner is not thread-safe).
        """
        with self._lock:
            if model_hash is not None and model_hash != self.model_hash:
                return False
            k = self._check_k(k, self.num_subnets)
            if self._dress.subnet != k:
                self._dress.set_subnet(k)
            return True

    @torch.no_grad()
    def predict_timed(self, x: np.ndarray, *, base: bool = False) -> Prediction:
        """Predicted classes and softmax confidences for a batch, with the model hash and the
        subnet that produced them and the forward time (read under the lock, so they agree).
        The personal model serves when one is set, unless ``base`` (e.g. to score versions)."""
        inputs = to_model_input(x)
        with self._lock:
            personal = None if base else self._personal
            net = personal if personal is not None else (
                self._dress if self._dress is not None else self._model)
            if net is None:
                raise RuntimeError("no model loaded")
            subnet, model_hash = self.active_subnet, self.model_hash
            personal_hash = self.personal_hash if personal is not None else ""
            start = time.perf_counter()
            logits = net(inputs)
            forward_ms = (time.perf_counter() - start) * 1e3
        conf, pred = torch.softmax(logits, dim=1).max(dim=1)
        return Prediction(pred.numpy(), conf.numpy(), model_hash, subnet, forward_ms, personal_hash)

    def predict(self, x: np.ndarray, *, base: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes and their softmax confidences for a batch."""
        p = self.predict_timed(x, base=base)
        return p.pred, p.conf

    def describe(self) -> dict:
        return {"model_hash": self.model_hash, "arch": self.arch.to_json() if self.arch else None,
                "personal_hash": self.personal_hash or None,
                "active_subnet": self.active_subnet, "num_subnets": self.num_subnets,
                "sparsities": list(self.tables.sparsities) if self.tables is not None else None}
