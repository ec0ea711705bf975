"""The fleet charts (edgeloop/plots.py, ``edgeloop fleet run --plots DIR``).

The fast tests draw from ``tests/vectors/fleet_rest_run.json``: the REST answers
(``GET /rounds/{id}``, ``GET /devices``) of a real local fleet run, recorded by
``python -m tests.test_plots tests/vectors/fleet_rest_run.json`` (two DPU rounds on digits, two
DRESS agents). The slow test runs a real fleet with ``plots_dir`` end to end.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

from edgeloop import plots

VECTOR = Path(__file__).parent / "vectors" / "fleet_rest_run.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recorded() -> tuple[list[plots.RoundFigures], list[plots.SubnetPoint], dict]:
    data = json.loads(VECTOR.read_text())
    rounds = [plots.round_figures(r["number"], r["report"], data["devices"], r["delivery_s"]) for r in data["rounds"]]
    return rounds, plots.subnet_points(data["devices"]), data


def assert_valid_png(path: Path) -> tuple[int, int]:
    """Signature, every chunk's CRC, IHDR first and IEND last; returns (width, height)."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pos, kinds, size = 8, [], (0, 0)
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, body = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return size


def test_figures_follow_the_rest_definitions() -> None:
    rounds, points, data = _recorded()
    assert [r.round for r in rounds] == [1, 2]
    for fig, rec in zip(rounds, data["rounds"], strict=True):
        report = rec["report"]
        assert fig.bytes_sent == sum(d["bytes_sent"] for d in report["devices"]) > 0
        assert fig.full_bytes == report["metrics"]["full_model_bytes"] * report["devices_total"]
        assert fig.val_accuracy == report["metrics"]["val_accuracy"]
        assert fig.training_s is not None and fig.training_s > 0
    # The DPU round ships far less than full models would have; the first (full) one does not.
    assert rounds[1].bytes_sent < rounds[1].full_bytes / 5
    assert plots.cumulative([r.bytes_sent for r in rounds])[-1] == sum(r.bytes_sent for r in rounds)
    # Each DRESS agent reports its active subnet's measured latency.
    assert {p.device for p in points} == {d["name"] for d in data["devices"]}
    assert len({p.subnet for p in points}) == 2


def test_charts_are_valid_pngs_with_their_series(tmp_path: Path) -> None:
    rounds, points, _ = _recorded()
    acc_bytes = plots.accuracy_bytes_figure(rounds)
    acc_ax, bytes_ax = acc_bytes.axes
    assert [ln.get_label() for ln in acc_ax.lines] == ["server validation", "agents (mean, local labels)"]
    sent, full = bytes_ax.lines
    assert list(sent.get_ydata()) == pytest.approx([v / 1e6 for v in plots.cumulative([r.bytes_sent for r in rounds])])
    assert full.get_ydata()[-1] > sent.get_ydata()[-1]
    scatter = plots.subnet_latency_figure(points).axes[0]
    assert len(scatter.collections) == len({p.subnet for p in points})  # one series per subnet
    times = plots.round_times_figure(rounds).axes[0]
    assert len(times.containers) == 2 and all(len(c) == len(rounds) for c in times.containers)

    paths = plots.write_fleet_plots(tmp_path / "charts", rounds, points)
    assert [p.name for p in paths] == list(plots.PLOT_FILES)
    for p in paths:
        assert p.stat().st_size > 5000  # drawn, not an empty canvas
        width, height = assert_valid_png(p)
        assert width >= 600 and height >= 300


def test_charts_without_data_still_render(tmp_path: Path) -> None:
    paths = plots.write_fleet_plots(tmp_path, [], [])
    for p in paths:
        assert_valid_png(p)
    assert plots.subnet_points([{"name": "a", "metrics": {"accuracy": 0.5}}]) == []  # no latency: no point


@pytest.mark.slow
def test_fleet_run_writes_the_charts(tmp_path: Path) -> None:
    """A real local fleet (server + 2 agents, two DPU rounds) with ``plots_dir``."""
    from edgeloop.fleet import run_fleet

    out = tmp_path / "charts"
    result = run_fleet(_config(tmp_path / "w", plots_dir=out))
    assert result.ok
    assert all(r.delivery_s is not None and r.training_s for r in result.rows)
    for name in plots.PLOT_FILES:
        assert_valid_png(out / name)


def _config(work: Path, **kw):
    from edgeloop.fleet import FleetConfig

    return FleetConfig(agents=2, rounds=2, dataset="digits", samples_per_agent=300, epochs=3, rate_per_s=0,
                       extra_params={"k": 0.05, "skip_if_worse": False}, work_dir=work, **kw)


def record(path: Path) -> None:
    """Run the short real fleet and save its REST answers as the test vector."""
    import tempfile

    from edgeloop.fleet import LocalFleet

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp) / "w")
        fleet = LocalFleet(cfg)
        try:
            fleet.start()
            fleet.wait_for_labelled(600, timeout=120)
            rows = [fleet.run_round(n) for n in (1, 2)]
            data = {"rounds": [{"number": r.round, "report": fleet.get(f"/rounds/{r.round_id}"),
                                "delivery_s": r.delivery_s} for r in rows],
                    "devices": fleet.get("/devices?limit=1000")["data"]}
        finally:
            fleet.stop()
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
