"""Pick the DRESS subnet to run under the budgets in force now (thesis §3.1, §3.5).

DRESS ships K nested sparse subnets in one set of tables; the denser ones are more accurate
and cost more latency, memory and energy, and switching is a ``set_subnet(k)`` with no weight
copy (§3.3.4). The thesis leaves the run-time choice to the device: "the sub-network with a
higher sparsity ... shall be adopted to inference under more severe resource constraints".
:class:`BudgetGovernor` makes that choice:

* the rule: the most accurate subnet whose estimated cost fits every budget (accuracy unknown:
  the densest that fits); if none fits, the cheapest (fewest FLOPs) and a budget miss;
* hysteresis: down immediately when the active subnet stops fitting (a budget is a promise);
  up only when the richer subnet fits with a margin, ``cost <= limit * (1 - hysteresis)``, and
  ``min_dwell_s`` after the last switch, so a budget oscillating around a threshold does not flap;
* drift: ``observe_latency`` keeps an EWMA of live latency. Its ratio to the observed subnet's
  profiled p50 scales every subnet's profiled latency (thermal throttling slows them all), which
  also stops a throttled device from "escaping" to a denser subnet whose profile is stale.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from edge_agent.budget_sources import Budget, BudgetError

logger = logging.getLogger(__name__)

# A rough system-level energy per FLOP of a phone-class CPU running small dense/sparse layers
# (about 5 W at 50 GFLOP/s effective): only the fallback when no power measurement exists.
DEFAULT_PJ_PER_FLOP = 100.0
ENERGY_SOURCES = ("measured", "flops-proxy")


def _nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise BudgetError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise BudgetError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


@dataclass(frozen=True)
class SubnetProfile:
    """What subnet ``index`` (0 = densest, as in shared/dress) costs per inference call."""

    index: int
    sparsity: float
    accuracy: float | None  # validation accuracy reported by the server; None if unknown
    latency_p50_ms: float
    latency_p95_ms: float
    peak_memory_mb: float
    energy_mj: float
    energy_source: Literal["measured", "flops-proxy"]
    flops: int
    # Kernel per layer the latencies were measured with (shared.dress.kernels.KernelPlan.codes):
    # "<batch>:<s|d per layer>" per profiled batch size; () when not chosen by measurement.
    kernels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.kernels, str) or not all(isinstance(c, str) for c in self.kernels):
            raise BudgetError(f"kernels must be a list of strings, got {self.kernels!r}")
        object.__setattr__(self, "kernels", tuple(self.kernels))
        if isinstance(self.index, bool) or not isinstance(self.index, (int, np.integer)) \
                or self.index < 0:
            raise BudgetError(f"subnet index must be an int >= 0, got {self.index!r}")
        object.__setattr__(self, "index", int(self.index))
        s = _nonneg("sparsity", self.sparsity)
        if s >= 1:
            raise BudgetError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", s)
        if self.accuracy is not None:
            acc = _nonneg("accuracy", self.accuracy)
            if acc > 1:
                raise BudgetError(f"accuracy must lie in [0, 1], got {self.accuracy!r}")
            object.__setattr__(self, "accuracy", acc)
        for name in ("latency_p50_ms", "latency_p95_ms", "peak_memory_mb", "energy_mj"):
            object.__setattr__(self, name, _nonneg(name, getattr(self, name)))
        if self.latency_p95_ms < self.latency_p50_ms:
            raise BudgetError(f"subnet {self.index}: latency p95 {self.latency_p95_ms} ms is below "
                              f"p50 {self.latency_p50_ms} ms")
        if self.energy_source not in ENERGY_SOURCES:
            raise BudgetError(f"energy_source must be one of {ENERGY_SOURCES}, "
                              f"got {self.energy_source!r}")
        flops = _nonneg("flops", self.flops)
        if flops != int(flops):
            raise BudgetError(f"flops must be a whole number, got {self.flops!r}")
        object.__setattr__(self, "flops", int(flops))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetProfile:
        names = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - {"accuracy", "kernels"})
        if unknown or missing:
            raise BudgetError(f"subnet profile: unknown fields {unknown}, missing fields {missing}")
        return cls(**{"accuracy": None, **data})


def energy_mj(
    latency_ms: float, flops: int, power_w: float | None = None,
    pj_per_flop: float = DEFAULT_PJ_PER_FLOP,
) -> tuple[float, Literal["measured", "flops-proxy"]]:
    """Energy of one call: measured power x latency (W x ms = mJ), else a FLOPs proxy."""
    if power_w is not None:
        return _nonneg("power_w", power_w) * _nonneg("latency_ms", latency_ms), "measured"
    return _nonneg("flops", flops) * _nonneg("pj_per_flop", pj_per_flop) * 1e-9, "flops-proxy"


def build_profile(
    index: int, sparsity: float, latencies_ms: Sequence[float], *, peak_memory_mb: float,
    flops: int, accuracy: float | None = None, power_w: float | None = None,
    pj_per_flop: float = DEFAULT_PJ_PER_FLOP,
) -> SubnetProfile:
    """A profile from timed calls of one subnet (e.g. shared/dress profiling helpers)."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0 or not np.all(np.isfinite(lat)) or np.any(lat < 0):
        raise BudgetError(f"subnet {index}: need >= 1 finite latency >= 0, got {lat.size} values")
    p50, p95 = (float(v) for v in np.percentile(lat, [50, 95]))
    energy, source = energy_mj(p50, flops, power_w, pj_per_flop)
    return SubnetProfile(index, sparsity, accuracy, p50, p95, peak_memory_mb, energy, source, flops)


@dataclass(frozen=True)
class Decision:
    subnet: int  # the subnet to run now
    budget: Budget  # the merged budget it was judged against
    fits: bool  # whether that subnet fits it
    reason: str
    switched: bool = False  # differs from the previously active subnet
    previous: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"subnet": self.subnet, "budget": self.budget.to_dict(), "fits": self.fits,
                "reason": self.reason, "switched": self.switched, "previous": self.previous}


def preference_order(profiles: Iterable[SubnetProfile]) -> list[int]:
    """Subnet indices, most preferred first.

    By accuracy when every subnet has one (ties: the sparser, cheaper one); otherwise by
    density, since the densest nested subnet contains all the others' weights (Eq. 3.3) and is
    assumed the most accurate. Mixed known/unknown accuracies are not comparable, so density.
    """
    ps = list(profiles)
    if all(p.accuracy is not None for p in ps):
        ps.sort(key=lambda p: (-p.accuracy, -p.sparsity, p.index))
    else:
        ps.sort(key=lambda p: (p.sparsity, p.index))
    return [p.index for p in ps]


class BudgetGovernor:
    """Chooses the active DRESS subnet; thread-safe (one lock around all state).

    ``sources`` have ``name`` and ``read() -> Budget``; those that also have
    ``tighten(budget) -> Budget`` (:class:`~edge_agent.budget_sources.LoadBudgetSource`) scale
    the merged budget afterwards. A source that raises keeps its last good budget. ``power_w``
    (e.g. ``lambda: battery.power_w``) turns energy into measured power x latency for every
    subnet when it returns a number. Call :meth:`decide` from a control loop (sources may touch
    sysfs) and apply ``runner.set_subnet(decision.subnet)`` when it changes.
    """

    def __init__(
        self,
        profiles: Sequence[SubnetProfile],
        sources: Sequence[Any] = (),
        *,
        hysteresis: float = 0.1,
        min_dwell_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        latency_stat: Literal["p50", "p95"] = "p95",
        ewma_alpha: float = 0.2,
        power_w: Callable[[], float | None] | None = None,
    ) -> None:
        if not (math.isfinite(hysteresis) and 0 <= hysteresis < 1):
            raise BudgetError(f"hysteresis must lie in [0, 1), got {hysteresis}")
        if not (math.isfinite(min_dwell_s) and min_dwell_s >= 0):
            raise BudgetError(f"min_dwell_s must be a finite number >= 0, got {min_dwell_s}")
        if latency_stat not in ("p50", "p95"):
            raise BudgetError(f"latency_stat must be 'p50' or 'p95', got {latency_stat!r}")
        if not (math.isfinite(ewma_alpha) and 0 < ewma_alpha <= 1):
            raise BudgetError(f"ewma_alpha must lie in (0, 1], got {ewma_alpha}")
        for s in sources:
            if not callable(getattr(s, "read", None)):
                raise BudgetError(f"budget source {s!r} has no read() method")
        self.hysteresis, self.min_dwell_s = float(hysteresis), float(min_dwell_s)
        self.latency_stat = latency_stat
        self.ewma_alpha = float(ewma_alpha)
        self._sources = list(sources)
        self._clock = clock
        self._power_w = power_w
        self._lock = threading.RLock()
        self._last_good: dict[int, Budget] = {}
        self._failing: set[int] = set()
        self._active: int | None = None
        self._fresh = True  # next decision selects from scratch (start, new profiles)
        self._last_switch = -math.inf
        self._last: Decision | None = None
        self.switches = self.budget_hits = self.budget_misses = self.decisions = 0
        self._set_profiles(profiles)

    # --- profiles and live latency ------------------------------------------------------------
    def _set_profiles(self, profiles: Sequence[SubnetProfile]) -> None:
        ps = list(profiles)
        if not ps:
            raise BudgetError("the governor needs at least one subnet profile")
        for p in ps:
            if not isinstance(p, SubnetProfile):
                raise BudgetError(f"profiles must be SubnetProfile objects, got {type(p).__name__}")
        indices = [p.index for p in ps]
        if len(set(indices)) != len(indices):
            raise BudgetError(f"subnet indices must be unique, got {sorted(indices)}")
        self._profiles = {p.index: p for p in ps}
        self._order = preference_order(ps)
        self._rank = {k: r for r, k in enumerate(self._order)}
        self._cheapest = min(ps, key=lambda p: (p.flops, -p.sparsity, p.latency_p50_ms,
                                                p.peak_memory_mb, p.index)).index
        self._ewma: dict[int, float] = {}
        self._drift_from: int | None = None  # the subnet observed last

    def update_profiles(self, profiles: Sequence[SubnetProfile]) -> Decision:
        """New profiles after a model update: forget live latency and choose afresh."""
        with self._lock:
            self._set_profiles(profiles)
            self._fresh = True
            return self.decide()

    def observe_latency(self, k: int, ms: float) -> None:
        """Feed one live latency of subnet ``k``, measured like its profile (same batch size)."""
        ms = _nonneg("latency ms", ms)
        with self._lock:
            if k not in self._profiles:
                raise BudgetError(f"unknown subnet {k}; have {sorted(self._profiles)}")
            prev = self._ewma.get(k)
            self._ewma[k] = ms if prev is None else prev + self.ewma_alpha * (ms - prev)
            self._drift_from = k

    @property
    def latency_drift(self) -> float:
        """Live/profiled latency of the subnet observed last (1.0 before any observation)."""
        with self._lock:
            k = self._drift_from
            if k is None or self._profiles[k].latency_p50_ms <= 0:
                return 1.0
            return self._ewma[k] / self._profiles[k].latency_p50_ms

    # --- cost estimates ------------------------------------------------------------------------
    def _costs(self, p: SubnetProfile, drift: float, power: float | None) -> tuple[float, float, float]:
        """(latency ms, memory MB, energy mJ) of one call of ``p`` on the device as it is now."""
        stat = p.latency_p95_ms if self.latency_stat == "p95" else p.latency_p50_ms
        latency = stat * drift
        if power is not None:  # mean energy: mean power over the typical (p50) call time
            energy = power * p.latency_p50_ms * drift
        elif p.energy_source == "measured":  # power x latency: a slower call costs more
            energy = p.energy_mj * drift
        else:
            energy = p.energy_mj
        return latency, p.peak_memory_mb, energy

    @staticmethod
    def _violations(costs: tuple[float, float, float], budget: Budget, margin: float = 0.0) -> str:
        """'' if the costs fit ``budget`` shrunk by ``margin``; otherwise what does not fit."""
        out = []
        for (label, unit), cost, limit in zip(
            (("latency", "ms"), ("memory", "MB"), ("energy", "mJ")), costs,
            (budget.latency_ms, budget.memory_mb, budget.energy_mj), strict=True,
        ):
            if limit is not None and cost > limit * (1 - margin):
                out.append(f"{label} {cost:.4g} > {limit * (1 - margin):.4g} {unit}")
        return ", ".join(out)

    def _read_budget(self) -> Budget:
        budgets = []
        for i, s in enumerate(self._sources):
            try:
                b = s.read()
                if not isinstance(b, Budget):
                    raise TypeError(f"read() returned {type(b).__name__}, not Budget")
            except Exception as exc:  # noqa: BLE001 - a broken source must not stop inference
                if i not in self._failing:
                    logger.warning("budget source %s failed, keeping its last budget: %s",
                                   getattr(s, "name", s), exc)
                    self._failing.add(i)
                b = self._last_good.get(i, Budget())
            else:
                self._last_good[i] = b
                self._failing.discard(i)
            budgets.append(b)
        merged = Budget.merge(*budgets)
        for s in self._sources:
            tighten = getattr(s, "tighten", None)
            if callable(tighten):
                try:
                    merged = tighten(merged)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("budget source %s could not tighten: %s",
                                   getattr(s, "name", s), exc)
        return merged

    def _power(self) -> float | None:
        if self._power_w is None:
            return None
        try:
            p = self._power_w()
            return None if p is None else _nonneg("power_w", p)
        except Exception as exc:  # noqa: BLE001 - fall back to the profiled energy
            logger.debug("power reading failed: %s", exc)
            return None

    # --- the decision ----------------------------------------------------------------------------
    def decide(self) -> Decision:
        """Read the sources, choose the subnet to run, update the counters."""
        with self._lock:
            now = self._clock()
            budget = self._read_budget()
            drift, power = self.latency_drift, self._power()
            costs = {k: self._costs(p, drift, power) for k, p in self._profiles.items()}
            misfit = {k: self._violations(c, budget) for k, c in costs.items()}
            best = next((k for k in self._order if not misfit[k]), None)
            target = self._cheapest if best is None else best
            previous = self._active
            current = previous if previous in self._profiles else None
            if current is None or self._fresh:
                new = target
                reason = (f"selected subnet {new}: most preferred that fits" if best is not None
                          else f"no subnet fits ({misfit[new]}); cheapest is subnet {new}")
            elif misfit[current]:
                new = target  # safety first: no dwell, no margin
                reason = (f"subnet {current} exceeds {misfit[current]}; " +
                          (f"switched to subnet {new}" if best is not None and new != current
                           else f"no subnet fits; cheapest is subnet {new}"))
            else:
                new, reason = self._maybe_up(current, costs, budget, now)
            switched = previous is not None and new != previous
            if switched:
                self.switches += 1
                logger.info("subnet %d -> %d: %s", previous, new, reason)
            if switched or previous is None:
                self._last_switch = now
            self._active, self._fresh = new, False
            fits = not misfit[new]
            self.decisions += 1
            if fits:
                self.budget_hits += 1
            else:
                self.budget_misses += 1
            self._last = Decision(new, budget, fits, reason, switched, previous)
            return self._last

    def _maybe_up(self, current: int, costs: dict, budget: Budget, now: float) -> tuple[int, str]:
        """The active subnet fits: move to a preferred one only with margin and after dwell."""
        up = next((k for k in self._order[: self._rank[current]]
                   if not self._violations(costs[k], budget, self.hysteresis)), None)
        if up is None:
            return current, f"kept subnet {current}: fits, nothing better fits with margin"
        waited = now - self._last_switch
        if waited < self.min_dwell_s:
            return current, (f"kept subnet {current}: subnet {up} fits with margin but only "
                             f"{waited:.3g} s of {self.min_dwell_s:g} s dwell passed")
        return up, f"up to subnet {up}: fits with {self.hysteresis:.0%} margin"

    # --- reporting -------------------------------------------------------------------------------
    @property
    def active(self) -> int | None:
        return self._active

    @property
    def last_decision(self) -> Decision | None:
        return self._last

    @property
    def profiles(self) -> list[SubnetProfile]:
        with self._lock:
            return [self._profiles[k] for k in sorted(self._profiles)]

    def metrics(self) -> dict[str, float]:
        """Flat floats for heartbeats; budget keys appear only while that limit is set."""
        with self._lock:
            m = {
                "active_subnet": float(-1 if self._active is None else self._active),
                "switches": float(self.switches),
                "budget_hits": float(self.budget_hits),
                "budget_misses": float(self.budget_misses),
                "latency_drift": self.latency_drift,
            }
            d = self._last
            if d is not None:
                m["budget_fits"] = float(d.fits)
                for key, value in (("latency_budget_ms", d.budget.latency_ms),
                                   ("memory_budget_mb", d.budget.memory_mb),
                                   ("energy_budget_mj", d.budget.energy_mj)):
                    if value is not None:
                        m[key] = value
            if self._active is not None:
                p = self._profiles[self._active]
                lat, mem, energy = self._costs(p, self.latency_drift, self._power())
                m.update(active_sparsity=p.sparsity, active_latency_ms=lat,
                         active_memory_mb=mem, active_energy_mj=energy)
                if p.accuracy is not None:
                    m["active_accuracy"] = p.accuracy
            for s in self._sources:
                extra = getattr(s, "metrics", None)
                if callable(extra):
                    try:
                        m.update({k: float(v) for k, v in extra().items()})
                    except Exception as exc:  # noqa: BLE001 - reporting must not break
                        logger.debug("metrics of source %s failed: %s", getattr(s, "name", s), exc)
            return m

    def status(self) -> dict[str, Any]:
        """For GET /status: the last decision, each source's budget, the profiles."""
        with self._lock:
            return {
                "decision": None if self._last is None else self._last.to_dict(),
                "sources": {getattr(s, "name", f"source{i}"): self._last_good.get(i, Budget()).to_dict()
                            for i, s in enumerate(self._sources)},
                "profiles": [p.to_dict() for p in self.profiles],
                "metrics": self.metrics(),
            }


__all__ = ["DEFAULT_PJ_PER_FLOP", "Budget", "BudgetGovernor", "Decision", "SubnetProfile",
           "build_profile", "energy_mj", "preference_order"]
