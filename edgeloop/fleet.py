"""The local fleet: a real server and N real agent processes on loopback, driven over REST.

This is the embedded default deployment (SQLite, local files, temporary data directory) and
the README's main job: it starts everything, waits for uploads, triggers rounds through the
REST API exactly as an operator would, prints a per-round table, and stops cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


@dataclass
class FleetConfig:
    agents: int = 3
    rounds: int = 3
    dataset: str = "fashion-mnist"
    samples_per_agent: int = 1000
    method: str = "dpu"
    model_kind: str = "mlp"
    epochs: int = 10
    extra_params: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None
    database_url: str | None = None
    rate_per_s: float = 400.0
    round_timeout_s: float = 900.0
    json_out: Path | None = None
    shard_alpha: float = 0.5
    startup_timeout_s: float = 120.0
    # DRESS nested subnets (empty: a plain model) and the static budget of each agent, cycled
    # over the agents. Energy is in mJ per inference (a FLOPs proxy where no power is measured:
    # the dense 784-512-512-10 MLP costs ~0.13 mJ, its 95%-sparse subnet ~0.007 mJ).
    dress_sparsities: str = "0.5,0.8,0.9,0.95"
    budgets: list[dict[str, float]] = field(default_factory=lambda: [{}, {"energy_mj": 0.03}, {"energy_mj": 0.01}])
    # TLS on both ports as users run it: the server creates its local CA in the work dir and
    # the agents (and the REST client here) pin it. True: plaintext, with the warnings.
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.agents < 1 or self.rounds < 1 or self.samples_per_agent < 1:
            raise ValueError("agents, rounds and samples_per_agent must be >= 1")


@dataclass
class RoundRow:
    round: int
    round_id: str
    status: str
    reason: str
    labelled_samples: int
    val_accuracy: float | None
    base_val_accuracy: float | None
    bytes_per_agent: dict[str, int]
    agents_on_version: int
    agents_total: int
    agents_rolled_back: int
    agent_accuracy: float | None
    wall_s: float
    model_hash: str | None
    metrics: dict[str, Any]


@dataclass
class FleetResult:
    ok: bool
    rows: list[RoundRow]
    full_model_bytes: int | None = None


def _python() -> list[str]:
    return [sys.executable, "-m", "edgeloop"]


def create_enrollment_token(database_url: str, *, name: str, max_uses: int, tags: list[str] | None = None,
                            expires_in_s: float = 86400.0) -> str:
    """An enrollment token on the (migrated) database at ``database_url``, for the fleet runner
    and the end-to-end tests; returns the secret agents present."""
    from datetime import timedelta

    from server.db.engine import make_engine, make_session_factory, transaction
    from server.domain import enrollment

    engine = make_engine(database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            return enrollment.create_token(session, name=name, tags=tags, max_uses=max_uses,
                                           expires_in=timedelta(seconds=expires_in_s)).secret
    finally:
        engine.dispose()


def operator_token(server_data_dir: Path) -> str:
    """An admin token for the fleet's REST calls: EDGELOOP_OPERATOR_TOKEN if the environment
    provisions one, else the token the server wrote to its data dir at first start."""
    from server.domain.operators import read_bootstrap_token

    return os.environ.get("EDGELOOP_OPERATOR_TOKEN") or read_bootstrap_token(server_data_dir)


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM every process still running, then SIGKILL each one that has not exited
    ``timeout_s`` seconds later (all are asked first, so they shut down in parallel)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LocalFleet:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self._tmp = cfg.work_dir is None
        self.work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="edgeloop-fleet-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.server: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []
        self.api: httpx.Client | None = None
        self.grpc_port = 0
        self.enrollment_token = ""
        self.ca_file: str | None = None

    # --- processes ----------------------------------------------------------------------------
    def start(self) -> None:
        ready = self.work / "server.ready.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "EDGELOOP_MODEL_KIND": self.cfg.model_kind,
               "EDGELOOP_DRESS_SPARSITIES": self.cfg.dress_sparsities}
        if self.cfg.database_url:
            env["EDGELOOP_DATABASE_URL"] = self.cfg.database_url
        from shared.data import load_dataset

        ds = load_dataset(self.cfg.dataset)
        env["EDGELOOP_INPUT_SHAPE"] = ",".join(str(d) for d in ds.input_shape)
        env["EDGELOOP_NUM_CLASSES"] = str(ds.num_classes)
        self.server = subprocess.Popen(
            [*_python(), "server", "run", "--data-dir", str(self.work / "server"), "--rest-port", "0",
             "--grpc-port", "0", "--ready-file", str(ready), *(["--insecure"] if self.cfg.insecure else [])],
            env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not ready.exists():
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited with code {self.server.returncode} during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.1)
        ports = json.loads(ready.read_text())
        self.grpc_port = ports["grpc_port"]
        # No built-in enrollment token: issue one for exactly these agents, as an operator would.
        db_url = self.cfg.database_url or f"sqlite:///{(self.work / 'server' / 'edgeloop.db').resolve()}"
        self.enrollment_token = create_enrollment_token(db_url, name="local fleet", max_uses=self.cfg.agents,
                                                        tags=["sim"])
        self.ca_file = ca_file = ports.get("ca_file")  # None: plaintext (insecure)
        auth = {"Authorization": f"Bearer {operator_token(self.work / 'server')}"}
        if ports.get("tls"):
            self.api = httpx.Client(base_url=f"https://127.0.0.1:{ports['rest_port']}/api/v1", timeout=30,
                                    verify=ssl.create_default_context(cafile=ca_file), headers=auth)
            pin = ["--ca-file", ca_file]
        else:
            self.api = httpx.Client(base_url=f"http://127.0.0.1:{ports['rest_port']}/api/v1", timeout=30,
                                    headers=auth)
            pin = ["--insecure"]
        for i in range(self.cfg.agents):
            agent_env = {**os.environ, "EDGELOOP_AGENT_SHARD_ALPHA": str(self.cfg.shard_alpha),
                         "EDGELOOP_AGENT_ENROLLMENT_TOKEN": self.enrollment_token}  # env, not argv (ps)
            budget = self.cfg.budgets[i % len(self.cfg.budgets)] if self.cfg.budgets else {}
            for key, value in budget.items():
                agent_env[f"EDGELOOP_AGENT_BUDGET_{key.upper()}"] = str(value)
            self.agents.append(subprocess.Popen(
                [*_python(), "agent", "run", "--server", f"127.0.0.1:{self.grpc_port}",
                 "--data-dir", str(self.work / f"agent-{i}"), "--name", f"sim-{i}", "--tags", "sim",
                 "--dataset", self.cfg.dataset, "--shard-index", str(i), "--num-shards", str(self.cfg.agents),
                 "--max-samples", str(self.cfg.samples_per_agent), "--rate-per-s", str(self.cfg.rate_per_s),
                 "--status-port", "-1", *pin],
                env=agent_env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True))

    def stop(self) -> None:
        stop_processes([*self.agents, *([self.server] if self.server else [])])
        if self.api is not None:
            self.api.close()
        if self._tmp:
            shutil.rmtree(self.work, ignore_errors=True)

    def _check_alive(self) -> None:
        if self.server is not None and self.server.poll() is not None:
            raise RuntimeError(f"server died with code {self.server.returncode}")
        dead = [i for i, p in enumerate(self.agents) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"agent(s) {dead} died")

    # --- REST helpers -------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        assert self.api is not None
        r = self.api.get(path)
        r.raise_for_status()
        return r.json()

    def labelled_total(self) -> int:
        return int(self.get("/samples/counts")["labelled"])

    def wait_for_labelled(self, target: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            self._check_alive()
            n = self.labelled_total()
            if n >= target:
                return n
            time.sleep(0.5)
        log.warning("only %d of %d labelled samples arrived in time", n, target)
        return n

    def run_round(self, number: int) -> RoundRow:
        assert self.api is not None
        params = {"epochs": self.cfg.epochs, **self.cfg.extra_params}
        t0 = time.monotonic()
        r = self.api.post("/rounds", json={"method": self.cfg.method, "cohort": {"all": True}, "params": params})
        if r.status_code >= 400:
            raise RuntimeError(f"POST /rounds failed: {r.status_code} {r.text}")
        round_id = r.json()["id"]
        deadline = t0 + self.cfg.round_timeout_s
        report: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            report = self.get(f"/rounds/{round_id}")
            if report["status"] in ("skipped", "failed"):
                break
            if report["status"] == "done" and _settled(report):
                break
            time.sleep(0.3)
        devices = {d["id"]: d for d in self.get("/devices?limit=1000")["data"]}
        accs = [d["metrics"].get("recent_accuracy", d["metrics"].get("accuracy")) for d in devices.values() if d["model_hash"] == report.get("model_hash")]
        accs = [a for a in accs if a is not None]
        m = report.get("metrics", {})
        return RoundRow(
            round=number, round_id=round_id, status=report["status"], reason=report.get("reason", ""),
            labelled_samples=int(m.get("labelled_samples", 0)), val_accuracy=m.get("val_accuracy"),
            base_val_accuracy=m.get("base_val_accuracy"),
            bytes_per_agent={devices.get(d["device_id"], {}).get("name", d["device_id"]): d["bytes_sent"]
                             for d in report.get("devices", [])},
            agents_on_version=report.get("devices_on_version", 0), agents_total=report.get("devices_total", 0),
            agents_rolled_back=len(report.get("rollbacks", [])),
            agent_accuracy=sum(accs) / len(accs) if accs else None, wall_s=time.monotonic() - t0,
            model_hash=report.get("model_hash"), metrics=m,
        )


def _settled(report: dict[str, Any]) -> bool:
    """Every device of the round is done with its version: committed it (a device on probation
    already runs it, but may still roll it back), or rolled it back."""
    rolled_back = {r["device_id"] for r in report.get("rollbacks", [])}
    return all(d["device_id"] in rolled_back or (d["on_version"] and d["state"] == "committed")
               for d in report.get("devices", []))


def _fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def render_table(rows: list[RoundRow], console: Console) -> None:
    table = Table(title="EdgeLoop local fleet: update rounds")
    for col in ("round", "method", "status", "labelled", "val acc before -> after", "subnet val acc",
                "bytes sent per agent", "vs full model", "agents on new version", "agent acc", "wall s"):
        table.add_column(col, justify="right")
    for r in rows:
        sent = list(r.bytes_per_agent.values())
        if not sent:
            per_agent = "-"
        elif min(sent) == max(sent):
            per_agent = f"{sent[0]:,}"
        else:
            per_agent = f"{min(sent):,} - {max(sent):,}"
        full = r.metrics.get("full_model_bytes")
        ratio = f"{100 * max(sent) / full:.2f}%" if sent and full else "-"
        variant = r.metrics.get("variant") or ""
        # "full" and "<objective>-full" (a first round fitted in full) ship every weight: no k.
        full = variant == "full" or variant.endswith("-full") or "k" not in r.metrics
        method = variant + ("" if full else f" k={r.metrics['k']:g}")
        table.add_row(str(r.round), method or "-", r.status if r.status != "skipped" else f"skipped ({r.reason[:40]})",
                      str(r.labelled_samples), f"{_fmt_acc(r.base_val_accuracy)} -> {_fmt_acc(r.val_accuracy)}",
                      "/".join(f"{100 * a:.1f}" for a in r.metrics.get("subnet_val_accuracy") or []) or "-",
                      per_agent, ratio, f"{r.agents_on_version}/{r.agents_total}"
                      + (f" ({r.agents_rolled_back} rolled back)" if r.agents_rolled_back else ""),
                      _fmt_acc(r.agent_accuracy),
                      f"{r.wall_s:.1f}")
    console.print(table)


def render_devices(devices: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="agents at the end of the run")
    for col in ("agent", "model", "active subnet", "budget", "budget hits / misses", "accuracy"):
        table.add_column(col, justify="right")
    for d in devices:
        m = d.get("metrics") or {}
        budget = ", ".join(f"{k}={v:g}" for k, v in (d.get("budget") or {}).items()) or "none"
        acc = m.get("recent_accuracy", m.get("accuracy"))
        table.add_row(d.get("name", d["id"]), (d.get("model_hash") or "-")[:12], str(d.get("active_subnet", -1)),
                      budget, f"{int(m.get('budget_hits', 0))} / {int(m.get('budget_misses', 0))}", _fmt_acc(acc))
    console.print(table)


def run_fleet(cfg: FleetConfig) -> FleetResult:
    console = Console(width=None if sys.stdout.isatty() else 200)
    fleet = LocalFleet(cfg)
    rows: list[RoundRow] = []
    ok = False
    try:
        fleet.start()
        console.print(f"[bold]fleet[/bold]: server + {cfg.agents} agents on {cfg.dataset}, work dir {fleet.work}")
        total = cfg.agents * cfg.samples_per_agent
        per_round_timeout = max(60.0, 3 * cfg.samples_per_agent / max(cfg.rate_per_s, 1e-6))
        for r in range(1, cfg.rounds + 1):
            # Data keeps arriving: round r trains on (about) r/R of everything the agents will send.
            target = int(total * r / cfg.rounds * 0.98)
            have = fleet.wait_for_labelled(target, per_round_timeout)
            console.print(f"round {r}: {have} labelled samples on the server, triggering via POST /api/v1/rounds")
            row = fleet.run_round(r)
            rows.append(row)
            console.print(f"round {r}: {row.status} in {row.wall_s:.1f}s, val acc {_fmt_acc(row.val_accuracy)}, "
                          f"{row.agents_on_version}/{row.agents_total} agents on the new version")
        render_table(rows, console)
        render_devices(fleet.get("/devices?limit=1000")["data"], console)
        ok = all(r.status in ("done", "skipped") for r in rows) and all(
            r.agents_on_version + r.agents_rolled_back == r.agents_total for r in rows if r.status == "done")
        if cfg.json_out:
            cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
            cfg.json_out.write_text(json.dumps({"config": {**asdict(cfg), "work_dir": str(cfg.work_dir),
                                                           "json_out": str(cfg.json_out)},
                                                "rounds": [asdict(r) for r in rows]}, indent=2, default=str))
    finally:
        fleet.stop()
    console.print("[green]fleet stopped cleanly[/green]" if ok else "[red]fleet finished with problems[/red]")
    return FleetResult(ok, rows)
