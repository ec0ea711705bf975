"""Probation: is a freshly installed model worse, on this device's own labelled inputs, than
the model it replaced?

Both models are scored on the same newest ``LocalDataset.recent(n)`` entries, each on a
private :class:`~edge_agent.runner.ModelRunner` (the live runner keeps serving meanwhile); a
DRESS model is judged on its densest subnet, the version at its best, since which subnet
serves is the budget governor's later choice (thesis §3.1). The new model passes unless its
accuracy is below the old one's by more than ``margin``; too few local labels pass it too
(nothing to judge on, said in the reason), as does an old model that is no reference: none,
or one its family says was never trained (``Objective.needs_full_fit``, e.g. a DRESS
version 0; the server's skip-if-worse makes the same exception). A new model that fails to
load or run fails probation (Mender's commit-after-health-check; RAUC ``mark-good``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_agent.local_data import LocalDataset
from edge_agent.model_store import InstalledModel
from edge_agent.runner import ModelRunner
from edge_agent.update_state import Probation
from shared.objectives import objective_for

log = logging.getLogger(__name__)
SCORE_BATCH = 64  # bounds the memory of one scoring forward on a small device


@dataclass(frozen=True)
class ProbationConfig:
    margin: float = 0.05  # the new model may trail the old by at most this (absolute accuracy)
    min_samples: int = 20  # fewer local labels than this: commit without judging
    samples: int = 256  # newest local labels to score on

    def __post_init__(self) -> None:
        if not 0 <= self.margin <= 1:
            raise ValueError(f"probation margin must lie in [0, 1], got {self.margin}")
        if self.min_samples < 1 or self.samples < self.min_samples:
            raise ValueError(f"need 1 <= min_samples ({self.min_samples}) <= samples ({self.samples})")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    scores: Probation


def accuracy(model: InstalledModel, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` on ``(x, y)`` run as the agent runs it (a DRESS model on its
    densest subnet); raises if it cannot run."""
    runner = ModelRunner()
    runner.load(model.arch, model.state, model.model_hash)
    if runner.num_subnets:
        runner.set_subnet(0)
    preds = [runner.predict(x[i: i + SCORE_BATCH])[0] for i in range(0, len(x), SCORE_BATCH)]
    return float(np.mean(np.concatenate(preds) == y))


def untrained(model: InstalledModel) -> bool:
    """Whether the model's family says it was never trained (no reference to compare with)."""
    try:
        return objective_for(model.arch).needs_full_fit(model.state)
    except Exception:  # noqa: BLE001 - an unknown family: judge it like any model
        log.debug("no objective for %s", model.arch.kind, exc_info=True)
        return False


def judge(new: InstalledModel, old: InstalledModel | None, local: LocalDataset,
          cfg: ProbationConfig) -> Verdict:
    """The verdict on ``new``. Raises whatever loading or running ``new`` raises (the caller
    turns that into a rollback): a model that cannot run is never committed."""
    x, y = local.recent(cfg.samples)
    if len(y) and tuple(x.shape[1:]) != tuple(new.arch.input_shape):
        x, y = x[:0], y[:0]  # inputs of another shape cannot say anything about this model
    try:
        new_acc = accuracy(new, x, y) if len(y) else None
    except Exception as exc:
        raise RuntimeError(f"the new model fails to run: {exc}") from exc
    if len(y) < cfg.min_samples:
        return Verdict(True, f"not enough local labels to judge ({len(y)} < {cfg.min_samples})",
                       Probation(len(y), new_acc, None))
    if old is None:
        return Verdict(True, "no previous model to compare with", Probation(len(y), new_acc, None))
    if untrained(old):
        return Verdict(True, "the previous model was never trained: no reference",
                       Probation(len(y), new_acc, None))
    try:
        old_acc = accuracy(old, x, y)
    except Exception as exc:  # noqa: BLE001 - the old model being broken is no reason to keep it
        log.warning("previous model %s cannot be scored: %s", old.model_hash[:12], exc)
        return Verdict(True, f"previous model cannot be scored ({exc})", Probation(len(y), new_acc, None))
    scores = Probation(len(y), new_acc, old_acc)
    assert new_acc is not None
    if new_acc < old_acc - cfg.margin:
        return Verdict(False, f"accuracy {new_acc:.3f} on {len(y)} local labels is below the previous "
                              f"model's {old_acc:.3f} by more than {cfg.margin:g}", scores)
    return Verdict(True, f"accuracy {new_acc:.3f} vs previous {old_acc:.3f} on {len(y)} local labels",
                   scores)
