"""Fleet charts as PNG (``edgeloop fleet run --plots DIR``), built from plain REST data.

The quantities are defined once here, over what the REST API answers, so that the web console
(/ui) and the CLI draw the same figures:

* **accuracy per round**: the round's ``metrics.val_accuracy`` (server held-out split) and the
  mean of ``metrics.recent_accuracy`` (else ``accuracy``) over the devices running the round's
  model (their probation score on local labels).
* **bytes per round**: ``sum(devices[].bytes_sent)`` of ``GET /rounds/{id}`` (bytes actually
  streamed for the round's version, resumed downloads summed) against
  ``metrics.full_model_bytes * devices_total`` (what shipping every targeted device the full
  model artefact would have cost); both cumulative over the rounds.
* **per-subnet accuracy against measured latency**: one point per device of ``GET /devices``
  whose heartbeat reports ``active_latency_ms`` (the active subnet's latency profiled on the
  device, scaled by its live drift); y is ``active_accuracy`` (that subnet's server validation
  accuracy), else the device's ``recent_accuracy``/``accuracy``; one series per
  ``active_subnet`` (-1: a plain model).
* **time per round**: training = ``finished_at - started_at`` of the round; delivery = from the
  moment the client saw the round ``done`` to the moment every targeted device ran the version
  committed or had rolled it back (observed by the client: the CLI polls, the console follows
  the events).

matplotlib is the ``bench`` extra; only this module needs it, imported when a chart is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILES = ("accuracy_bytes.png", "subnet_accuracy_latency.png", "round_times.png")


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise a clear error naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotsUnavailableError(
            "--plots needs matplotlib: pip install 'edgeloop[bench]' (or .venv/bin/pip install matplotlib)"
        ) from exc


@dataclass(frozen=True)
class RoundFigures:
    round: int
    status: str
    val_accuracy: float | None
    agent_accuracy: float | None
    bytes_sent: int  # streamed for this round's version, all targeted devices
    full_bytes: int | None  # full_model_bytes x devices_total (None: unknown)
    training_s: float | None
    delivery_s: float | None


@dataclass(frozen=True)
class SubnetPoint:
    device: str
    subnet: int
    latency_ms: float
    accuracy: float


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def device_accuracy(device: dict[str, Any]) -> float | None:
    m = device.get("metrics") or {}
    acc = m.get("recent_accuracy", m.get("accuracy"))
    return None if acc is None else float(acc)


def round_figures(number: int, report: dict[str, Any], devices: Iterable[dict[str, Any]] = (),
                  delivery_s: float | None = None) -> RoundFigures:
    """The figures of one round from its ``GET /rounds/{id}`` report and ``GET /devices`` rows
    (for the agents' accuracy); ``delivery_s`` is what the client observed (see the module doc)."""
    m = report.get("metrics") or {}
    sent = sum(int(d.get("bytes_sent", 0)) for d in report.get("devices", []))
    full = m.get("full_model_bytes")
    total = int(report.get("devices_total", 0))
    model = report.get("model_hash")
    accs = [a for d in devices if model and d.get("model_hash") == model
            for a in [device_accuracy(d)] if a is not None]
    return RoundFigures(
        round=number, status=str(report.get("status", "")),
        val_accuracy=None if m.get("val_accuracy") is None else float(m["val_accuracy"]),
        agent_accuracy=sum(accs) / len(accs) if accs else None, bytes_sent=sent,
        full_bytes=int(full) * total if full is not None else None,
        training_s=_seconds_between(report.get("started_at"), report.get("finished_at")), delivery_s=delivery_s)


def subnet_points(devices: Iterable[dict[str, Any]]) -> list[SubnetPoint]:
    """One point per device that reports a measured latency for its active subnet."""
    points = []
    for d in devices:
        m = d.get("metrics") or {}
        lat = m.get("active_latency_ms")
        acc = m.get("active_accuracy", device_accuracy(d))
        if lat is None or acc is None:
            continue
        subnet = int(m.get("active_subnet", d.get("active_subnet", -1)))
        points.append(SubnetPoint(str(d.get("name") or d.get("id", "?")), subnet, float(lat), float(acc)))
    return points


def cumulative(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")  # no pyplot: no GUI, thread-safe


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} reported", ha="center", va="center", transform=ax.transAxes)


def accuracy_bytes_figure(rounds: Sequence[RoundFigures]) -> Figure:
    """Left: accuracy over rounds (server validation, agents); right: cumulative bytes sent
    against what full models would have cost."""
    fig = _figure(10.0)
    acc_ax, bytes_ax = fig.subplots(1, 2)
    xs = [r.round for r in rounds]
    for label, values in (("server validation", [r.val_accuracy for r in rounds]),
                          ("agents (mean, local labels)", [r.agent_accuracy for r in rounds])):
        pts = [(x, 100 * v) for x, v in zip(xs, values, strict=True) if v is not None]
        if pts:
            acc_ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    acc_ax.set(title="accuracy over rounds", xlabel="round", ylabel="accuracy (%)")
    if acc_ax.lines:
        acc_ax.legend()
    else:
        _no_data(acc_ax, "accuracy")
    if rounds:
        bytes_ax.plot(xs, [v / 1e6 for v in cumulative([r.bytes_sent for r in rounds])], marker="o",
                      label="sent (DPU / diffs)")
        if all(r.full_bytes is not None for r in rounds):
            bytes_ax.plot(xs, [v / 1e6 for v in cumulative([float(r.full_bytes or 0) for r in rounds])],
                          marker="s", linestyle="--", label="full models would have cost")
        bytes_ax.legend()
    else:
        _no_data(bytes_ax, "round")
    bytes_ax.set(title="cumulative bytes to the fleet", xlabel="round", ylabel="MB (10^6 bytes)")
    for ax in (acc_ax, bytes_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    return fig


def subnet_latency_figure(points: Sequence[SubnetPoint]) -> Figure:
    """Accuracy of each device's active subnet against its measured latency, a series per subnet."""
    fig = _figure()
    ax = fig.subplots()
    for subnet in sorted({p.subnet for p in points}):
        mine = [p for p in points if p.subnet == subnet]
        ax.scatter([p.latency_ms for p in mine], [100 * p.accuracy for p in mine], s=40,
                   label="plain model" if subnet < 0 else f"subnet {subnet}")
        for p in mine:
            ax.annotate(p.device, (p.latency_ms, 100 * p.accuracy), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    if points:
        ax.legend()
    else:
        _no_data(ax, "subnet latency")
    ax.set(title="per-subnet accuracy against measured latency (fleet)", xlabel="measured latency (ms)",
           ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    return fig


def round_times_figure(rounds: Sequence[RoundFigures]) -> Figure:
    """Training and delivery seconds per round, stacked."""
    fig = _figure()
    ax = fig.subplots()
    xs = [r.round for r in rounds]
    train = [r.training_s or 0.0 for r in rounds]
    ax.bar(xs, train, label="training (server)")
    ax.bar(xs, [r.delivery_s or 0.0 for r in rounds], bottom=train, label="delivery (to every device settled)")
    ax.set(title="time per round", xlabel="round", ylabel="seconds")
    ax.set_xticks(xs)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


def write_fleet_plots(out_dir: Path, rounds: Sequence[RoundFigures], points: Sequence[SubnetPoint]) -> list[Path]:
    """Write the three charts as PNG into ``out_dir`` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = (accuracy_bytes_figure(rounds), subnet_latency_figure(points), round_times_figure(rounds))
    paths = []
    for name, fig in zip(PLOT_FILES, figures, strict=True):
        path = out_dir / name
        fig.savefig(path, format="png")
        paths.append(path)
    return paths
