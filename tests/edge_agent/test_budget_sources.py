from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.budget_sources import (
    BatteryBudgetSource,
    BatteryPolicy,
    Budget,
    BudgetError,
    BudgetSource,
    FileBudgetSource,
    HttpBudgetSource,
    LoadBudgetSource,
    StaticBudgetSource,
    read_batteries,
)
from edge_agent.status_http import StatusServer


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- Budget -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"latency_ms": -1}, "latency_ms must be >= 0"),
        ({"memory_mb": float("nan")}, "memory_mb must be >= 0"),
        ({"energy_mj": "5"}, "energy_mj must be a number"),
        ({"latency_ms": True}, "latency_ms must be a number"),
    ],
)
def test_budget_refuses_bad_limits(kwargs, fragment):
    with pytest.raises(BudgetError, match=fragment):
        Budget(**kwargs)


def test_budget_normalises_numbers_and_infinity():
    b = Budget(latency_ms=5, memory_mb=float("inf"), energy_mj=0)
    assert b == Budget(5.0, None, 0.0) and isinstance(b.latency_ms, float)
    assert Budget().unlimited and not b.unlimited


def test_merge_takes_the_tightest_of_each_field():
    merged = Budget.merge(Budget(latency_ms=10, energy_mj=3), Budget(latency_ms=4),
                          Budget(memory_mb=64, energy_mj=5))
    assert merged == Budget(latency_ms=4, memory_mb=64, energy_mj=3)
    assert Budget.merge() == Budget()
    with pytest.raises(BudgetError, match="dict"):
        Budget.merge(Budget(), {"latency_ms": 1})


limits = st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(limits, limits, limits), max_size=5))
def test_merge_is_order_free_and_never_looser(fields_list):
    budgets = [Budget(*f) for f in fields_list]
    merged = Budget.merge(*budgets)
    assert merged == Budget.merge(*reversed(budgets))
    for name in ("latency_ms", "memory_mb", "energy_mj"):
        values = [getattr(b, name) for b in budgets if getattr(b, name) is not None]
        assert getattr(merged, name) == (min(values) if values else None)


def test_budget_dict_round_trip_and_unknown_keys():
    b = Budget(latency_ms=2.5, energy_mj=1)
    assert b.to_dict() == {"latency_ms": 2.5, "memory_mb": None, "energy_mj": 1.0}
    assert Budget.from_dict(b.to_dict()) == b
    assert Budget.from_dict({"memory_mb": 32}) == Budget(memory_mb=32)
    with pytest.raises(BudgetError, match=r"unknown budget field\(s\) \['latency'\]"):
        Budget.from_dict({"latency": 5})
    with pytest.raises(BudgetError, match="JSON object"):
        Budget.from_dict([1, 2])


def test_static_source():
    src = StaticBudgetSource(Budget(latency_ms=3))
    assert isinstance(src, BudgetSource) and src.name == "config"
    assert src.read() == Budget(latency_ms=3)
    with pytest.raises(BudgetError, match="Budget"):
        StaticBudgetSource({"latency_ms": 3})


# --- HTTP ---------------------------------------------------------------------------------------
def test_http_put_is_a_partial_update_and_null_clears():
    changes = []
    src = HttpBudgetSource(Budget(energy_mj=4), on_change=changes.append)
    assert src.on_put({"latency_ms": 8}) == {"latency_ms": 8.0, "memory_mb": None, "energy_mj": 4.0}
    assert src.on_put({"energy_mj": None}) == {"latency_ms": 8.0, "memory_mb": None, "energy_mj": None}
    assert src.read() == Budget(latency_ms=8)
    assert changes == [Budget(latency_ms=8, energy_mj=4), Budget(latency_ms=8)]
    for bad in ({"latency_ms": -3}, {"latency_ms": 1, "bogus": 2}, {"memory_mb": "lots"}):
        with pytest.raises(BudgetError):
            src.on_put(bad)
    assert src.read() == Budget(latency_ms=8), "a refused PUT must not change anything"


def _put(port: int, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/budget", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_source_through_a_real_status_server():
    src = HttpBudgetSource()
    with StatusServer("127.0.0.1", 0, on_put_budget=src.on_put) as server:
        code, body = _put(server.port, json.dumps({"latency_ms": 12.5, "memory_mb": 100}).encode())
        assert code == 200 and body == {"latency_ms": 12.5, "memory_mb": 100.0, "energy_mj": None}
        assert src.read() == Budget(latency_ms=12.5, memory_mb=100)

        code, body = _put(server.port, b'{"memory_mb": null, "energy_mj": 0.7}')
        assert code == 200 and src.read() == Budget(latency_ms=12.5, energy_mj=0.7)

        code, body = _put(server.port, b'{"energy_mj": -1}')
        assert code == 400 and "energy_mj must be >= 0" in body["error"]
        code, body = _put(server.port, b'{"latency_s": 1}')
        assert code == 400 and "latency_s" in body["error"]
        assert src.read() == Budget(latency_ms=12.5, energy_mj=0.7)


# --- file ---------------------------------------------------------------------------------------
class BudgetFile:
    """Writes the budget file atomically with a distinct mtime each time (coarse-mtime safe)."""

    def __init__(self, path) -> None:
        self.path, self.version = path, 0

    def write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        self.version += 1
        os.utime(tmp, ns=(self.version * 10**9, self.version * 10**9))
        os.replace(tmp, self.path)


def test_file_source_follows_the_file(tmp_path, caplog):
    f = BudgetFile(tmp_path / "budget.json")
    src = FileBudgetSource(f.path)
    assert src.read() == Budget()  # no file: no limit
    f.write('{"latency_ms": 5, "energy_mj": 2}')
    assert src.read() == Budget(latency_ms=5, energy_mj=2)
    f.write('{"latency_ms": 9}')
    assert src.read() == Budget(latency_ms=9)

    caplog.set_level(logging.WARNING, logger="edge_agent.budget_sources")
    for bad in ('{"latency_ms": 3', '{"latency_ms": -3}', '{"watts": 3}', '[1]', "\xff\xfe"):
        caplog.clear()
        f.write(bad)
        for _ in range(3):
            assert src.read() == Budget(latency_ms=9), f"bad file {bad!r} replaced the budget"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, f"want one warning for {bad!r}, got {len(warnings)}"

    f.write('{"memory_mb": 48}')
    assert src.read() == Budget(memory_mb=48)
    f.path.unlink()
    assert src.read() == Budget()


def test_file_source_rereads_at_most_every_refresh_s(tmp_path):
    clock = FakeClock()
    f = BudgetFile(tmp_path / "budget.json")
    f.write('{"latency_ms": 5}')
    src = FileBudgetSource(f.path, refresh_s=2.0, clock=clock)
    assert src.read() == Budget(latency_ms=5)
    f.write('{"latency_ms": 1}')
    clock.t += 1.0
    assert src.read() == Budget(latency_ms=5)
    clock.t += 1.0
    assert src.read() == Budget(latency_ms=1)


# --- battery ------------------------------------------------------------------------------------
def supply(root, name: str, **attrs) -> None:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for key, value in attrs.items():
        (d / key).write_text(f"{value}\n")


@pytest.fixture
def psu(tmp_path):
    root = tmp_path / "power_supply"
    supply(root, "AC", type="Mains", online=0)
    supply(root, "hidpp_battery_0", type="Battery", scope="Device", capacity=3, status="Discharging")
    return root


POLICY = BatteryPolicy(((10, 0.5), (25, 2.0)))


@pytest.mark.parametrize(
    "attrs, energy, power_w",
    [
        ({"capacity": 8, "status": "Discharging", "power_now": 6_500_000}, 0.5, 6.5),
        ({"capacity": 20, "status": "Discharging", "current_now": -1_000_000,
          "voltage_now": 12_000_000}, 2.0, 12.0),
        ({"capacity": 60, "status": "Discharging"}, None, None),
        ({"capacity": 8, "status": "Charging", "power_now": 20_000_000}, None, 20.0),
        ({"energy_now": 9_000_000, "energy_full": 50_000_000, "status": "Discharging"}, 2.0, None),
        ({"capacity": "n/a", "status": "Discharging"}, None, None),
        ({"capacity": 5, "status": "Discharging", "power_now": "garbage"}, 0.5, None),
    ],
)
def test_battery_source_maps_level_to_energy(psu, attrs, energy, power_w):
    supply(psu, "BAT0", type="Battery", **attrs)
    src = BatteryBudgetSource(psu, POLICY, refresh_s=0)
    assert src.read() == Budget(energy_mj=energy)
    assert src.power_w == (pytest.approx(power_w) if power_w is not None else None)


def test_battery_source_without_batteries_gives_no_limit(tmp_path, psu):
    assert BatteryBudgetSource(psu, POLICY).read() == Budget()  # a mouse battery only
    assert BatteryBudgetSource(tmp_path / "nowhere", POLICY).read() == Budget()
    assert read_batteries(tmp_path / "nowhere").batteries == 0


def test_battery_policy_can_apply_on_the_charger_and_averages_batteries(psu):
    supply(psu, "BAT0", type="Battery", capacity=10, status="Charging", power_now=1_000_000)
    supply(psu, "BAT1", type="Battery", capacity=20, status="Full", power_now=2_000_000)
    reading = read_batteries(psu)
    assert (reading.level_pct, reading.batteries, reading.discharging) == (15.0, 2, False)
    assert reading.power_w == pytest.approx(3.0)
    on_charger = BatteryPolicy(((10, 0.5), (25, 2.0)), apply_when_charging=True)
    assert BatteryBudgetSource(psu, on_charger).read() == Budget(energy_mj=2.0)
    assert BatteryBudgetSource(psu, POLICY).read() == Budget()


def test_battery_source_refreshes_on_its_interval(psu):
    clock = FakeClock()
    supply(psu, "BAT0", type="Battery", capacity=50, status="Discharging")
    src = BatteryBudgetSource(psu, POLICY, refresh_s=5, clock=clock)
    assert src.read() == Budget()
    supply(psu, "BAT0", capacity=9)
    clock.t += 4.9
    assert src.read() == Budget()
    clock.t += 0.2
    assert src.read() == Budget(energy_mj=0.5)
    assert src.metrics() == {"on_battery": 1.0, "battery_pct": 9.0}


def test_battery_policy_parse_and_validation():
    assert BatteryPolicy.parse("10:0.5, 25:2").steps == ((10.0, 0.5), (25.0, 2.0))
    assert BatteryPolicy.parse("").energy_mj(1, True) is None
    for text, fragment in [("10-0.5", "pct:mJ"), ("25:2,10:0.5", "must increase"),
                           ("10:3,25:2", "must not shrink"), ("0:1", r"\(0, 100\]"),
                           ("10:-1", ">= 0"), ("10:inf", "finite")]:
        with pytest.raises(BudgetError, match=fragment):
            BatteryPolicy.parse(text)


# --- load and temperature -------------------------------------------------------------------------
def zones(tmp_path, *millideg) -> object:
    root = tmp_path / "thermal"
    for i, t in enumerate(millideg):
        supply(root, f"thermal_zone{i}", type="x86_pkg_temp", temp=t)
    root.mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize(
    "load1, temps, factor",
    [
        (1.0, (45000, 52000), 1.0),
        (9.0, (45000,), 1.5),  # 9 runnable tasks on 4 CPUs
        (1.0, (45000, 91000), 1.5),
        (9.0, (91000,), 2.25),
        (1.0, (-273200, 255000, "x", 40000), 1.0),  # absent sensors and garbage ignored
        (1.0, (), 1.0),
    ],
)
def test_load_source_tightens_latency(tmp_path, load1, temps, factor):
    src = LoadBudgetSource(thermal_root=zones(tmp_path, *temps), loadavg=lambda: (load1, 0, 0),
                           cpu_count=4, hot_c=85)
    assert src.read() == Budget()
    assert src.latency_factor == pytest.approx(factor)
    tightened = src.tighten(Budget(latency_ms=30, energy_mj=2))
    assert tightened == Budget(latency_ms=30 / factor, energy_mj=2)
    assert src.tighten(Budget(memory_mb=5)) == Budget(memory_mb=5)


def test_load_source_without_loadavg_or_thermal_zones(tmp_path):
    def no_loadavg():
        raise OSError("not available")

    src = LoadBudgetSource(thermal_root=tmp_path / "missing", loadavg=no_loadavg)
    assert src.latency_factor == 1.0 and src.metrics() == {"latency_factor": 1.0}
    with pytest.raises(BudgetError, match="load_factor"):
        LoadBudgetSource(load_factor=0.5)
    with pytest.raises(BudgetError, match="refresh_s"):
        LoadBudgetSource(refresh_s=math.nan)
