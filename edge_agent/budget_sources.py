"""Resource budgets and where they come from: config, PUT /budget, a file, the battery, load.

DRESS exists because "the resource constraints on the target edge devices may change
dynamically during runtime" (thesis §3.1): the allowed inference time, the battery energy, the
allocatable RAM. A :class:`Budget` names those three limits per inference call; ``None`` is no
limit. Each source answers ``read() -> Budget`` cheaply and without blocking (sysfs is re-read
at most every ``refresh_s``); the governor takes the tightest of each field over all sources.
:class:`LoadBudgetSource` is different: it has no limit of its own but *tightens* the merged
latency budget (``tighten``), because a loaded or hot device runs the same subnet slower than
when it was profiled.

All /sys roots are injectable; a missing file means "no constraint from this source".
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

BUDGET_FIELDS = ("latency_ms", "memory_mb", "energy_mj")


class BudgetError(ValueError):
    """A budget, a policy or a source setting is malformed (the message names the value)."""


def _limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f"{name} must be a number or null (no limit), got {value!r}")
    v = float(value)
    if math.isnan(v) or v < 0:
        raise BudgetError(f"{name} must be >= 0, or null for no limit; got {value!r}")
    return None if math.isinf(v) else v  # +inf and "no limit" are the same budget


@dataclass(frozen=True)
class Budget:
    """Limits on one inference call of the active subnet; ``None`` means unlimited.

    ``latency_ms`` is wall time, ``memory_mb`` peak memory, ``energy_mj`` energy, all for one
    call at the batch size the subnets were profiled with.
    """

    latency_ms: float | None = None
    memory_mb: float | None = None
    energy_mj: float | None = None

    def __post_init__(self) -> None:
        for name in BUDGET_FIELDS:
            object.__setattr__(self, name, _limit(name, getattr(self, name)))

    @staticmethod
    def merge(*budgets: Budget) -> Budget:
        """The tightest limit of each field (``Budget()`` when given none)."""
        merged: dict[str, float | None] = {}
        for b in budgets:
            if not isinstance(b, Budget):
                raise BudgetError(f"can only merge Budget objects, got {type(b).__name__}")
        for name in BUDGET_FIELDS:
            limits = [getattr(b, name) for b in budgets if getattr(b, name) is not None]
            merged[name] = min(limits) if limits else None
        return Budget(**merged)

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in BUDGET_FIELDS)

    def to_dict(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in BUDGET_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """Parse ``{"latency_ms": 5, "energy_mj": null}``; missing keys are unlimited."""
        if not isinstance(data, Mapping):
            raise BudgetError(f"a budget must be a JSON object, got {type(data).__name__}")
        _check_keys(data)
        return cls(**{name: data.get(name) for name in BUDGET_FIELDS})


def _check_keys(data: Mapping[str, Any]) -> None:
    unknown = sorted(str(k) for k in data if k not in BUDGET_FIELDS)
    if unknown:
        raise BudgetError(f"unknown budget field(s) {unknown}; allowed: {list(BUDGET_FIELDS)}")


@runtime_checkable
class BudgetSource(Protocol):
    """Anything with a ``name`` and a cheap, non-blocking ``read() -> Budget``."""

    name: str

    def read(self) -> Budget: ...


class StaticBudgetSource:
    """A fixed budget, e.g. from the agent's configuration."""

    def __init__(self, budget: Budget | None = None, name: str = "config") -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise BudgetError(f"budget must be a Budget, got {type(budget).__name__}")
        self.name = name
        self.budget = budget or Budget()

    def read(self) -> Budget:
        return self.budget


class HttpBudgetSource:
    """The budget last PUT through the status endpoint (``StatusServer(on_put_budget=...)``).

    A PUT is a partial update: fields it names are set (``null`` clears a limit), fields it
    leaves out keep their value, so an operator can tighten latency without knowing the energy
    limit someone else set.
    """

    def __init__(
        self,
        initial: Budget | None = None,
        name: str = "http",
        on_change: Callable[[Budget], None] | None = None,
    ) -> None:
        self.name = name
        self._budget = initial or Budget()
        self._lock = threading.Lock()
        self._on_change = on_change  # e.g. wake the governor so a tighter budget applies now

    def read(self) -> Budget:
        return self._budget  # an immutable object: reading the reference needs no lock

    def on_put(self, payload: dict) -> dict:
        """Validate and apply a PUT body; returns the whole budget now in force.

        Raises :class:`BudgetError` (a ValueError, so StatusServer answers 400) and keeps the
        previous budget when any field is unknown or invalid.
        """
        if not isinstance(payload, Mapping):
            raise BudgetError(f"a budget must be a JSON object, got {type(payload).__name__}")
        _check_keys(payload)
        with self._lock:
            self._budget = replace(self._budget, **{k: payload[k] for k in payload})
            budget = self._budget
        logger.info("budget set over HTTP: %s", budget.to_dict())
        if self._on_change is not None:
            self._on_change(budget)
        return budget.to_dict()


class _Refreshing(ABC):
    """Recomputes a value at most every ``refresh_s`` seconds of ``clock``; cheap in between."""

    def __init__(self, refresh_s: float, clock: Callable[[], float]) -> None:
        if not (math.isfinite(refresh_s) and refresh_s >= 0):
            raise BudgetError(f"refresh_s must be a finite number >= 0, got {refresh_s}")
        self._refresh_s = float(refresh_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._next = -math.inf

    def _maybe_refresh(self) -> None:
        with self._lock:
            now = self._clock()
            if now >= self._next:
                self._refresh()
                self._next = now + self._refresh_s

    @abstractmethod
    def _refresh(self) -> None:
        """Re-read the source; called at most once per ``refresh_s``."""


class FileBudgetSource(_Refreshing):
    """A JSON budget file, re-read when it changes (mtime, size or inode).

    A file that cannot be read or parsed keeps the last good budget and logs one warning per
    bad version; a deleted file means no limit. Write it atomically (write + rename) so a reader
    never sees half a file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str = "file",
        refresh_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh_s, clock)
        self.name = name
        self.path = Path(path)
        self._key: object = None  # what the last attempt saw: (mtime_ns, size, inode) or an error
        self._good = Budget()

    def read(self) -> Budget:
        self._maybe_refresh()
        return self._good

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._key is not None:
                logger.info("budget file %s removed: no limit from it", self.path)
            self._key, self._good = None, Budget()
            return
        except OSError as exc:  # e.g. a directory we may not search: keep the last budget
            self._ignore(("stat", str(exc)), exc)
            return
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._key:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            budget = Budget.from_dict(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, BudgetError) as exc:
            self._ignore(key, exc)
            return
        self._key, self._good = key, budget
        logger.info("budget file %s: %s", self.path, budget.to_dict())

    def _ignore(self, key: object, exc: Exception) -> None:
        """Keep the last good budget; warn once per bad version, not on every read."""
        if key != self._key:
            self._key = key
            logger.warning("budget file %s ignored, keeping %s: %s", self.path, self._good, exc)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:  # missing, or a sysfs attribute the driver cannot answer (EIO, ENODATA)
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class BatteryPolicy:
    """Piecewise-constant map from battery level to an energy budget per inference call.

    ``steps`` are ``(below_pct, energy_mj)``: at a level below ``below_pct`` the budget is the
    ``energy_mj`` of the lowest such threshold; at or above the highest threshold, no limit.
    The budget only applies while discharging unless ``apply_when_charging``. The defaults
    are placeholders in the range of a small CNN on a phone-class CPU: tune them per device.
    """

    steps: tuple[tuple[float, float], ...] = ((10.0, 0.5), (25.0, 2.0))
    apply_when_charging: bool = False

    def __post_init__(self) -> None:
        try:
            steps = tuple((float(t), float(e)) for t, e in self.steps)
        except (TypeError, ValueError):
            raise BudgetError(f"battery steps must be (pct, mJ) pairs, got {self.steps!r}") from None
        for t, e in steps:
            if not (0 < t <= 100):
                raise BudgetError(f"battery threshold must lie in (0, 100] %, got {t}")
            _limit("battery energy_mj", e)
            if math.isinf(e):
                raise BudgetError(f"battery energy_mj must be finite, got {e}")
        for (t0, e0), (t1, e1) in zip(steps, steps[1:], strict=False):
            if t1 <= t0:
                raise BudgetError(f"battery thresholds must increase, got {t0} then {t1}")
            if e1 < e0:  # an emptier battery must never get a looser budget
                raise BudgetError(f"energy must not shrink as the level rises: {t0}%->{e0} mJ, "
                                  f"{t1}%->{e1} mJ")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def parse(cls, text: str, apply_when_charging: bool = False) -> BatteryPolicy:
        """``"10:0.5,25:2"`` -> steps ((10, 0.5), (25, 2.0)); ``""`` -> no steps (no limit)."""
        steps = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            try:
                pct, mj = item.split(":")
                steps.append((float(pct), float(mj)))
            except ValueError:
                raise BudgetError(f"battery policy items are 'pct:mJ', got {item!r}") from None
        return cls(tuple(steps), apply_when_charging)

    def energy_mj(self, level_pct: float, discharging: bool) -> float | None:
        if not discharging and not self.apply_when_charging:
            return None
        for below, energy in self.steps:
            if level_pct < below:
                return energy
        return None


@dataclass(frozen=True)
class BatteryReading:
    level_pct: float | None  # mean over the system's batteries
    status: str  # "Discharging", "Charging", "Full", "Not charging", ... ("" unknown)
    power_w: float | None  # summed draw where the driver reports it
    batteries: int

    @property
    def discharging(self) -> bool:
        return self.status == "Discharging"


NO_BATTERY = BatteryReading(None, "", None, 0)


def read_batteries(root: Path) -> BatteryReading:
    """The system batteries under a ``/sys/class/power_supply`` tree (peripherals skipped)."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return NO_BATTERY
    levels, statuses, powers = [], [], []
    for d in entries:
        if _read_text(d / "type") != "Battery" or _read_text(d / "scope") == "Device":
            continue  # mains/USB supplies, and a wireless mouse's battery (scope "Device")
        level = _read_number(d / "capacity")
        if level is None:  # some drivers report only energy or charge counters
            for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
                a, b = _read_number(d / now), _read_number(d / full)
                if a is not None and b:
                    level = 100.0 * a / b
                    break
        if level is not None:
            levels.append(min(100.0, max(0.0, level)))
        statuses.append(_read_text(d / "status") or "")
        power_uw = _read_number(d / "power_now")
        if power_uw is None:
            current_ua, voltage_uv = _read_number(d / "current_now"), _read_number(d / "voltage_now")
            if current_ua is not None and voltage_uv is not None:
                power_uw = current_ua * voltage_uv / 1e6
        if power_uw is not None:
            powers.append(abs(power_uw) / 1e6)  # some drivers sign the discharge current
    if not statuses:
        return NO_BATTERY
    status = "Discharging" if "Discharging" in statuses else next((s for s in statuses if s), "")
    return BatteryReading(
        level_pct=sum(levels) / len(levels) if levels else None,
        status=status,
        power_w=sum(powers) if powers else None,
        batteries=len(statuses),
    )


class BatteryBudgetSource(_Refreshing):
    """An energy budget from the battery level (:class:`BatteryPolicy`).

    Also exposes ``power_w``, the draw the battery reports (``power_now``, else
    ``current_now * voltage_now``), so energy per call can be measured as power x latency
    instead of estimated from FLOPs. ACPI battery reads can take milliseconds, hence the
    default ``refresh_s`` of 5 s (a battery level moves slowly).
    """

    def __init__(
        self,
        root: str | os.PathLike = "/sys/class/power_supply",
        policy: BatteryPolicy | None = None,
        *,
        name: str = "battery",
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh_s, clock)
        self.name = name
        self.root = Path(root)
        self.policy = policy or BatteryPolicy()
        self._reading = NO_BATTERY
        self._budget = Budget()

    def _refresh(self) -> None:
        r = read_batteries(self.root)
        energy = None if r.level_pct is None else self.policy.energy_mj(r.level_pct, r.discharging)
        self._reading, self._budget = r, Budget(energy_mj=energy)

    def read(self) -> Budget:
        self._maybe_refresh()
        return self._budget

    @property
    def reading(self) -> BatteryReading:
        self._maybe_refresh()
        return self._reading

    @property
    def power_w(self) -> float | None:
        return self.reading.power_w

    def metrics(self) -> dict[str, float]:
        r = self._reading
        m = {"on_battery": float(r.discharging)}
        if r.level_pct is not None:
            m["battery_pct"] = r.level_pct
        if r.power_w is not None:
            m["power_w"] = r.power_w
        return m


def max_temperature_c(root: Path) -> float | None:
    """The hottest ``thermal_zone*/temp`` (millidegrees C) under a /sys/class/thermal tree."""
    temps = []
    for zone in sorted(root.glob("thermal_zone*")):
        milli = _read_number(zone / "temp")
        # Absent sensors report values such as -273200 or 255000; neither is a temperature.
        if milli is not None and -50_000 <= milli <= 200_000:
            temps.append(milli / 1000.0)
    return max(temps) if temps else None


class LoadBudgetSource(_Refreshing):
    """Tightens the latency budget while the device is loaded or hot.

    Subnets are profiled on an idle, cool device; with more runnable tasks than cores, or under
    thermal throttling, the same subnet takes longer. ``tighten(budget)`` divides the latency
    limit by ``latency_factor`` (``load_factor`` when the 1-minute load per CPU exceeds
    ``load_per_cpu``, times ``thermal_factor`` when a thermal zone reaches ``hot_c``), so the
    governor picks a subnet whose *profiled* latency leaves room for the slowdown. ``read()``
    returns no limit: this source only scales limits that others set.
    """

    def __init__(
        self,
        *,
        thermal_root: str | os.PathLike = "/sys/class/thermal",
        hot_c: float = 80.0,
        thermal_factor: float = 1.5,
        load_per_cpu: float = 1.0,
        load_factor: float = 1.5,
        loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
        cpu_count: int | None = None,
        name: str = "load",
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh_s, clock)
        for label, v in (("thermal_factor", thermal_factor), ("load_factor", load_factor)):
            if not (math.isfinite(v) and v >= 1):
                raise BudgetError(f"{label} must be a finite number >= 1, got {v}")
        if not (math.isfinite(load_per_cpu) and load_per_cpu > 0):
            raise BudgetError(f"load_per_cpu must be a positive number, got {load_per_cpu}")
        if not math.isfinite(hot_c):
            raise BudgetError(f"hot_c must be finite, got {hot_c}")
        cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        if cpus < 1:
            raise BudgetError(f"cpu_count must be >= 1, got {cpus}")
        self.name = name
        self.thermal_root = Path(thermal_root)
        self.hot_c, self.thermal_factor = float(hot_c), float(thermal_factor)
        self.load_per_cpu, self.load_factor = float(load_per_cpu), float(load_factor)
        self._loadavg, self._cpus = loadavg, cpus
        self._factor = 1.0
        self._load: float | None = None
        self._temp: float | None = None

    def _refresh(self) -> None:
        try:
            self._load = float(self._loadavg()[0]) / self._cpus
        except (OSError, ValueError, IndexError, TypeError):  # no loadavg on this platform
            self._load = None
        self._temp = max_temperature_c(self.thermal_root)
        factor = 1.0
        if self._load is not None and self._load > self.load_per_cpu:
            factor *= self.load_factor
        if self._temp is not None and self._temp >= self.hot_c:
            factor *= self.thermal_factor
        self._factor = factor

    @property
    def latency_factor(self) -> float:
        self._maybe_refresh()
        return self._factor

    def read(self) -> Budget:
        self._maybe_refresh()
        return Budget()

    def tighten(self, budget: Budget) -> Budget:
        factor = self.latency_factor
        if budget.latency_ms is None or factor == 1.0:
            return budget
        return replace(budget, latency_ms=budget.latency_ms / factor)

    def metrics(self) -> dict[str, float]:
        m = {"latency_factor": self._factor}
        if self._load is not None:
            m["load_per_cpu"] = self._load
        if self._temp is not None:
            m["temperature_c"] = self._temp
        return m


__all__ = [
    "BUDGET_FIELDS", "BatteryBudgetSource", "BatteryPolicy", "BatteryReading", "Budget",
    "BudgetError", "BudgetSource", "FileBudgetSource", "HttpBudgetSource", "LoadBudgetSource",
    "StaticBudgetSource", "max_temperature_c", "read_batteries",
]
