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
from rich.markup import escape
from rich.table import Table

from edgeloop.plots import (
    RoundFigures,
    require_matplotlib,
    round_figures,
    subnet_points,
    write_fleet_plots,
)

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
    # p-Meta (model_kind "pmeta", docs/learner.md#p-meta-few-shot-new-classes): a conv4/pmeta
    # fleet model meta-trained on pmeta_ways-way tasks by "pmeta" rounds; agent 0 gets a
    # support set of few_shot_shots samples of each of few_shot_classes (labels of the
    # dataset), classes removed from every agent's stream, so the fleet model never saw them.
    pmeta_ways: int = 5
    few_shot_classes: tuple[int, ...] = ()
    few_shot_shots: int = 5
    # DA³ (docs/learner.md#da3-domain-adaptors): a resnet fleet model; agent 0 runs the da3
    # learner and, after the last round, its camera changes: it restarts streaming the same
    # shard with inverted pixels (domain "shifted"), adapts an adaptor over the frozen fleet
    # backbone and recovers its accuracy. The table shows before / after.
    domain_shift: bool = False
    # Write the fleet charts (edgeloop/plots.py) as PNG into this folder at the end of the run.
    plots_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.agents < 1 or self.rounds < 1 or self.samples_per_agent < 1:
            raise ValueError("agents, rounds and samples_per_agent must be >= 1")
        if self.few_shot_classes and self.model_kind != "pmeta":
            raise ValueError("few_shot_classes needs model_kind 'pmeta'")
        if self.domain_shift:
            if self.model_kind not in ("mlp", "resnet") or self.few_shot_classes:
                raise ValueError("domain_shift runs its own resnet fleet model (no pmeta, no few-shot)")
            self.model_kind, self.dress_sparsities = "resnet", ""
        if self.model_kind == "pmeta":
            if self.method not in ("pmeta", "dpu"):
                raise ValueError(f"model_kind 'pmeta' runs 'pmeta' rounds, not {self.method!r}")
            self.method, self.dress_sparsities = "pmeta", ""
            if self.few_shot_classes and not 2 <= len(self.few_shot_classes) <= self.pmeta_ways:
                raise ValueError(f"few_shot_classes: 2 to pmeta_ways={self.pmeta_ways} classes")


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
    training_s: float | None = None  # the round's finished_at - started_at (server)
    delivery_s: float | None = None  # from seeing it done to every device settled (observed here)


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
        self.agent_cmds: list[tuple[list[str], dict[str, str]]] = []  # to restart one (domain shift)
        self.rest_base = ""  # scheme://host:port of the REST API (the console is at <rest_base>/ui)
        self.operator_token = ""  # the admin token of the REST calls (printed once for the console)
        self.figures: list[RoundFigures] = []  # per round, for the charts (edgeloop/plots.py)

    # --- processes ----------------------------------------------------------------------------
    def start(self) -> None:
        ready = self.work / "server.ready.json"
        ready.unlink(missing_ok=True)
        pmeta = self.cfg.model_kind == "pmeta"
        env = {**os.environ, "EDGELOOP_MODEL_KIND": "conv4" if pmeta else self.cfg.model_kind,
               "EDGELOOP_DRESS_SPARSITIES": self.cfg.dress_sparsities}
        if self.cfg.database_url:
            env["EDGELOOP_DATABASE_URL"] = self.cfg.database_url
        from shared.data import load_dataset

        ds = load_dataset(self.cfg.dataset)
        env["EDGELOOP_INPUT_SHAPE"] = ",".join(str(d) for d in ds.input_shape)
        env["EDGELOOP_NUM_CLASSES"] = str(ds.num_classes)
        dataset = self.cfg.dataset
        if pmeta:
            from shared.pmeta import pmeta_spec

            env["EDGELOOP_MODEL_ARCH_JSON"] = pmeta_spec(ds.input_shape, self.cfg.pmeta_ways).to_json()
            dataset = self._few_shot_data(ds)
        if self.cfg.domain_shift:
            from shared.models import ArchSpec

            env["EDGELOOP_MODEL_ARCH_JSON"] = ArchSpec(kind="resnet", input_shape=ds.input_shape,
                                                       num_classes=ds.num_classes, hidden=(1, 1, 1),
                                                       channels=(8, 16, 32)).to_json()
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
        self.operator_token = operator_token(self.work / "server")
        auth = {"Authorization": f"Bearer {self.operator_token}"}
        self.rest_base = f"{'https' if ports.get('tls') else 'http'}://127.0.0.1:{ports['rest_port']}"
        if ports.get("tls"):
            self.api = httpx.Client(base_url=f"{self.rest_base}/api/v1", timeout=30,
                                    verify=ssl.create_default_context(cafile=ca_file), headers=auth)
            pin = ["--ca-file", ca_file]
        else:
            self.api = httpx.Client(base_url=f"{self.rest_base}/api/v1", timeout=30, headers=auth)
            pin = ["--insecure"]
        for i in range(self.cfg.agents):
            agent_env = {**os.environ, "EDGELOOP_AGENT_SHARD_ALPHA": str(self.cfg.shard_alpha),
                         "EDGELOOP_AGENT_ENROLLMENT_TOKEN": self.enrollment_token}  # env, not argv (ps)
            budget = self.cfg.budgets[i % len(self.cfg.budgets)] if self.cfg.budgets else {}
            for key, value in budget.items():
                agent_env[f"EDGELOOP_AGENT_BUDGET_{key.upper()}"] = str(value)
            if pmeta:
                # A meta-trained model is an initialisation, not a classifier of the stream's
                # labels: probation's accuracy on them says nothing, so it never rolls back.
                agent_env["EDGELOOP_AGENT_PROBATION_MARGIN"] = "1"
                if i == 0 and self.cfg.few_shot_classes:
                    agent_env["EDGELOOP_AGENT_LEARNER"] = "pmeta"
            if i == 0 and self.cfg.domain_shift:  # adapts on its newest 150 labelled samples
                agent_env.update({f"EDGELOOP_AGENT_{k}": v for k, v in (
                    ("LEARNER", "da3"), ("LEARNER_MIN_SAMPLES", "100"), ("LEARNER_MAX_SAMPLES", "150"),
                    ("LEARNER_RETRAIN_EVERY", "150"), ("LEARNER_EPOCHS", "15"), ("LEARNER_LR", "0.01"))})
            cmd = [*_python(), "agent", "run", "--server", f"127.0.0.1:{self.grpc_port}",
                   "--data-dir", str(self.work / f"agent-{i}"), "--name", f"sim-{i}", "--tags", "sim",
                   "--dataset", dataset, "--shard-index", str(i), "--num-shards", str(self.cfg.agents),
                   "--max-samples", str(self.cfg.samples_per_agent), "--rate-per-s", str(self.cfg.rate_per_s),
                   "--status-port", "-1", *pin]
            self.agent_cmds.append((cmd, agent_env))
            self.agents.append(subprocess.Popen(cmd, env=agent_env, stdout=sys.stderr, stderr=sys.stderr,
                                                start_new_session=True))

    def shift_domain(self) -> None:
        """Agent 0's camera changes: restart it (same identity and models, fresh local data)
        streaming its shard with inverted pixels, in the domain "shifted" (its own adaptor store)."""
        import numpy as np

        from shared.data import load_dataset

        ds = load_dataset(self.cfg.dataset)
        path = self.work / "shifted.npz"
        np.savez(path, x=(255 - ds.x_train).astype(np.uint8) if ds.x_train.dtype == np.uint8 else 1 - ds.x_train,
                 y=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
        stop_processes([self.agents[0]])
        # The old world's labelled samples would teach the new domain's adaptor the old one:
        # the device starts the new domain's local data afresh (its models and identity stay).
        for f in (self.work / "agent-0").glob("local_data.db*"):
            f.unlink()
        cmd, env = self.agent_cmds[0]
        cmd = [str(path) if prev == "--dataset" else a for prev, a in zip(["", *cmd[:-1]], cmd, strict=True)]
        self.agents[0] = subprocess.Popen(cmd, env={**env, "EDGELOOP_AGENT_LEARNER_DOMAIN": "shifted"},
                                          stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)

    def wait_for_adaptation(self, derivations: int, timeout: float) -> dict[str, Any] | None:
        """Agent 0's device view once its learner derived ``derivations`` times since its start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            for d in self.get("/devices?limit=1000")["data"]:
                m = d.get("metrics") or {}
                # A named domain: a heartbeat of the restarted agent, not the old process's.
                if d.get("name") == "sim-0" and m.get("learner_derivations", 0) >= derivations \
                        and m.get("learner_domain_named") == 1.0 \
                        and m.get("learner_personal_accuracy") is not None:
                    return d
            time.sleep(0.5)
        return None

    def _few_shot_data(self, ds: Any) -> str:
        """The agents' dataset without the few-shot classes (an .npz in the work dir), and agent
        0's support set of them (``agent-0/few-shot/class-<c>/<i>.npy``, from the test split)."""
        import numpy as np

        held = list(self.cfg.few_shot_classes)
        if not held:
            return self.cfg.dataset
        if any(not 0 <= c < ds.num_classes for c in held):
            raise ValueError(f"few_shot_classes must lie in [0, {ds.num_classes})")
        keep, keep_t = ~np.isin(ds.y_train, held), ~np.isin(ds.y_test, held)
        path = self.work / "fleet-classes.npz"
        np.savez(path, x=ds.x_train[keep], y=ds.y_train[keep], x_test=ds.x_test[keep_t], y_test=ds.y_test[keep_t])
        rng = np.random.default_rng(0)
        for c in held:
            folder = self.work / "agent-0" / "few-shot" / f"class-{c}"
            folder.mkdir(parents=True, exist_ok=True)
            idx = rng.choice(np.flatnonzero(ds.y_test == c), size=self.cfg.few_shot_shots, replace=False)
            for j, k in enumerate(idx):
                np.save(folder / f"{j}.npy", ds.x_test[k], allow_pickle=False)
        return str(path)

    def wait_for_personal(self, model_hash: str | None, timeout: float) -> dict[str, Any] | None:
        """The few-shot agent's device view once its heartbeat shows a personal model on
        ``model_hash`` (None: on any model), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            for d in self.get("/devices?limit=1000")["data"]:
                m = d.get("metrics") or {}
                if d.get("name") == "sim-0" and m.get("learner_serving_personal") == 1.0 and (
                        model_hash is None or d.get("model_hash") == model_hash):
                    return d
            time.sleep(0.5)
        return None

    def write_plots(self, out_dir: Path) -> list[Path]:
        """The fleet charts of the rounds run so far and the devices' latest heartbeats."""
        return write_fleet_plots(out_dir, self.figures, subnet_points(self.get("/devices?limit=1000")["data"]))

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
        params = {**({} if self.cfg.method == "pmeta" else {"epochs": self.cfg.epochs}), **self.cfg.extra_params}
        t0 = time.monotonic()
        r = self.api.post("/rounds", json={"method": self.cfg.method, "cohort": {"all": True}, "params": params})
        if r.status_code >= 400:
            raise RuntimeError(f"POST /rounds failed: {r.status_code} {r.text}")
        round_id = r.json()["id"]
        deadline = t0 + self.cfg.round_timeout_s
        report: dict[str, Any] = {}
        seen_done: float | None = None
        delivery_s: float | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            report = self.get(f"/rounds/{round_id}")
            if report["status"] in ("skipped", "failed"):
                break
            if report["status"] == "done":
                seen_done = time.monotonic() if seen_done is None else seen_done
                if _settled(report):
                    delivery_s = time.monotonic() - seen_done
                    break
            time.sleep(0.3)
        devices = {d["id"]: d for d in self.get("/devices?limit=1000")["data"]}
        fig = round_figures(number, report, devices.values(), delivery_s)
        self.figures.append(fig)
        m = report.get("metrics", {})
        return RoundRow(
            round=number, round_id=round_id, status=report["status"], reason=report.get("reason", ""),
            labelled_samples=int(m.get("labelled_samples", 0)), val_accuracy=m.get("val_accuracy"),
            base_val_accuracy=m.get("base_val_accuracy"),
            bytes_per_agent={devices.get(d["device_id"], {}).get("name", d["device_id"]): d["bytes_sent"]
                             for d in report.get("devices", [])},
            agents_on_version=report.get("devices_on_version", 0), agents_total=report.get("devices_total", 0),
            agents_rolled_back=len(report.get("rollbacks", [])),
            agent_accuracy=fig.agent_accuracy, wall_s=time.monotonic() - t0,
            model_hash=report.get("model_hash"), metrics=m, training_s=fig.training_s, delivery_s=delivery_s,
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
    # The learner columns appear only when some agent learns locally (p-Meta's few-shot classes
    # or a DA³ domain adaptor): its held-out accuracy, memory and time.
    few_shot = any("learner_personal_accuracy" in (d.get("metrics") or {}) for d in devices)
    cols = ["agent", "model", "active subnet", "budget", "budget hits / misses", "accuracy"]
    if few_shot:
        cols += ["personal acc (held out)", "adapt saved-for-backward", "adapt s"]
    for col in cols:
        table.add_column(col, justify="right")
    for d in devices:
        m = d.get("metrics") or {}
        budget = ", ".join(f"{k}={v:g}" for k, v in (d.get("budget") or {}).items()) or "none"
        acc = m.get("recent_accuracy", m.get("accuracy"))
        row = [d.get("name", d["id"]), (d.get("model_hash") or "-")[:12], str(d.get("active_subnet", -1)),
               budget, f"{int(m.get('budget_hits', 0))} / {int(m.get('budget_misses', 0))}", _fmt_acc(acc)]
        if few_shot:
            saved = m.get("learner_saved_bytes")
            row += [_fmt_acc(m.get("learner_personal_accuracy")),
                    "-" if saved is None else f"{saved / 1024:.1f} KiB",
                    "-" if m.get("learner_seconds") is None else f"{m['learner_seconds']:.2f}"]
        table.add_row(*row)
    console.print(table)


def _run_domain_shift(fleet: LocalFleet, console: Console, timeout: float) -> bool:
    """Shift agent 0's domain, wait for it to adapt on shifted samples only, print the table."""
    before: dict[str, Any] = next((d for d in fleet.get("/devices?limit=1000")["data"] if d.get("name") == "sim-0"), {})
    acc_before = (before.get("metrics") or {}).get("recent_accuracy", (before.get("metrics") or {}).get("accuracy"))
    console.print("domain shift: sim-0's camera now inverts its images (domain 'shifted'); adapting a DA³ adaptor")
    fleet.shift_domain()
    view = fleet.wait_for_adaptation(1, max(timeout, 180.0))  # on >= 100 shifted samples only
    table = Table(title="sim-0: domain shift and DA³ adaptation (held-out local samples)")
    for col in ("before the shift", "fleet model after the shift", "adapted (da3)", "gate sparsity",
                "saved for backward", "adapt s", "adaptor params"):
        table.add_column(col, justify="right")
    if view is None:
        console.print("[red]sim-0 did not adapt in time[/red]")
        return False
    m = view["metrics"]
    table.add_row(_fmt_acc(acc_before), _fmt_acc(m.get("learner_base_accuracy")),
                  _fmt_acc(m.get("learner_personal_accuracy")), f"{100 * m.get('learner_gate_sparsity', 0):.1f}%",
                  f"{m.get('learner_saved_bytes', 0) / 1024:.1f} KiB", f"{m.get('learner_seconds', 0):.2f}",
                  f"{int(m.get('learner_trainable_params', 0)):,}")
    console.print(table)
    return m.get("learner_personal_accuracy", 0) >= m.get("learner_base_accuracy", 1)


def print_console_access(fleet: LocalFleet, console: Console) -> None:
    """The web console's URL and the admin token to log in with, once, at start (the fleet is
    local and temporary: the token dies with its work dir unless --work-dir keeps it)."""
    console.print(f"[bold]console[/bold]: {escape(fleet.rest_base)}/ui  (open while the fleet runs)")
    console.print(f"[bold]operator token[/bold] (admin): {escape(fleet.operator_token)}")
    if fleet.ca_file:
        console.print(f"  TLS by the fleet's local CA: {escape(fleet.ca_file)} (trust it, or accept the browser's warning)")


def run_fleet(cfg: FleetConfig) -> FleetResult:
    console = Console(width=None if sys.stdout.isatty() else 200)
    if cfg.plots_dir is not None:
        require_matplotlib()  # fail before starting anything
    fleet = LocalFleet(cfg)
    rows: list[RoundRow] = []
    ok = False
    try:
        fleet.start()
        console.print(f"[bold]fleet[/bold]: server + {cfg.agents} agents on {cfg.dataset}, work dir {fleet.work}")
        print_console_access(fleet, console)
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
        personal_ok = True
        if cfg.few_shot_classes:
            last = next((r.model_hash for r in reversed(rows) if r.status == "done"), None)
            view = fleet.wait_for_personal(last, per_round_timeout)
            personal_ok = view is not None
            console.print(f"few-shot agent sim-0: {'serving a personal model of classes ' if view else 'no personal model for classes '}"
                          f"{list(cfg.few_shot_classes)} ({cfg.few_shot_shots} shots each, never seen by the fleet)")
        if cfg.domain_shift:
            personal_ok = _run_domain_shift(fleet, console, per_round_timeout)
        render_devices(fleet.get("/devices?limit=1000")["data"], console)
        if cfg.plots_dir is not None:
            for path in fleet.write_plots(cfg.plots_dir):
                console.print(f"chart: {escape(str(path))}")
        ok = personal_ok and all(r.status in ("done", "skipped") for r in rows) and all(
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
