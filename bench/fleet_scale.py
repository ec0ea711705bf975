"""Scale benchmark (issue 12): N simulated agents speaking the real gRPC protocol against a real
server started with default settings (TLS on, signed artefacts, fsync, SQLite).

Per N, a fresh server subprocess (``edgeloop server run``, its ready file, its first-start
operator token and an enrollment token for exactly N devices, as edgeloop/fleet.py does) and
``--procs`` harness processes, each one asyncio loop driving its share of the agents over
``grpc.aio``. Every agent:

- registers with the enrollment token and pins the signing keys of the Register answer;
- heartbeats at the interval the server names (default 5 s; first beat at a random phase);
- holds a WatchUpdates stream (reconnecting when the server ends it);
- uploads ``--samples-per-agent`` labelled samples of ``--dataset`` (its own slice);
- on every new target (pushed by WatchUpdates or named by a heartbeat answer) walks GetUpdate
  until it holds the target, checking each artefact as the reference agent does
  (edge_agent/updater.py): the signature of its statement by a pinned key before a byte is
  used, its size and SHA-256 over the bytes received, then the model hash it decodes to.

What the harness does not repeat per agent: decoding. Each distinct artefact is decoded once
per harness process and the result cached by its SHA-256 (every agent still hashes the bytes
it received and checks they are that artefact), so 5,000 agents do not decode the same
safetensors file 5,000 times and the harness's CPU is not what is measured. The initial
download of version 0 is paced by ``--sync-concurrency`` (devices of a real fleet come online
over time; the ramp is not part of what is measured).

Then the parent triggers a round over REST (default: DPU, 1 epoch, updating ratio 1% also from
the untrained version 0, shipped even if not better: the point is delivery), polls REST while
it trains and is delivered, and reports per N: delivery time (round done -> every agent
verified), agents missed, errors by RPC and status code, heartbeat p50/p99, REST p50/p99,
server CPU / RSS / threads (psutil on the server's process tree), and a steady-state phase
(``--steady-s``) with the server's CPU as a share of one core. JSON to ``--out``, a PNG beside it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fleet_scale.py --agents 100,1000,2000,5000
    OMP_NUM_THREADS=1 .venv/bin/python bench/fleet_scale.py --quick      # 300 agents, short phases
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_data import add_dataset_argument, fail, load_bench_dataset  # noqa: E402

TARGETS = {  # issue 12, on the 2-core host with the harness beside the server
    "agents": 5000, "delivery_s": 30.0, "missed": 0, "heartbeat_p99_ms": 500.0, "rest_p99_ms": 200.0,
    "server_rss_mb": 1536.0, "steady_cpu_pct": 30.0,
}
DEFAULT_ROUND_PARAMS = {"epochs": 1, "full_first_round": False, "skip_if_worse": False}
REST_PATHS = ("/healthz", "/api/v1/devices?limit=50", "/api/v1/rounds?limit=10")
MAX_CHAIN = 64
RETRY_AFTER_KEY = "retry-after-ms"


# ============================== harness process (the agents) ==================================


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: one socket per agent (and per server stream)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Decoded:
    encoding: str
    model_hash: str
    arch: Any
    state: Any


class DecodeCache:
    """Each distinct artefact decoded once per process (see the module docstring)."""

    def __init__(self) -> None:
        self._by_sha: dict[str, asyncio.Future[Decoded]] = {}
        self.models: dict[str, Decoded] = {}
        self.decodes = 0

    def has(self, sha: str) -> bool:
        return sha in self._by_sha

    async def result(self, sha: str, data: bytes | None, base_hash: str) -> Decoded:
        fut = self._by_sha.get(sha)
        if fut is None:
            if data is None:
                raise RuntimeError(f"artefact {sha[:12]} not decoded and its bytes were not kept")
            fut = asyncio.get_running_loop().create_future()
            self._by_sha[sha] = fut
            try:
                base = self.models.get(base_hash) if base_hash else None
                decoded = await asyncio.get_running_loop().run_in_executor(None, _decode, data, base)
                self.decodes += 1
                self.models.setdefault(decoded.model_hash, decoded)
                fut.set_result(decoded)
            except BaseException as exc:  # noqa: BLE001 - every waiter sees the same failure
                del self._by_sha[sha]
                fut.set_exception(exc)
                fut.exception()  # consumed here: no "never retrieved" warning
                raise
        return await asyncio.shield(fut)


def _decode(data: bytes, base: Decoded | None) -> Decoded:
    import shared.codec  # noqa: F401 - registers the diff/sparse-v1 decoder
    from shared.artefacts import decode_artefact

    d = decode_artefact(data, base.state if base else None, base_arch=base.arch if base else None)
    return Decoded(d.encoding, d.model_hash, d.arch or (base.arch if base else None), dict(d.state))


class VerifyError(Exception):
    pass


@dataclass
class HarnessStats:
    heartbeats: list[tuple[float, float]] = field(default_factory=list)  # (wall time, latency s)
    errors: Counter = field(default_factory=Counter)  # "Rpc:CODE"
    calls: Counter = field(default_factory=Counter)
    bytes_downloaded: int = 0
    verify_failures: int = 0


class Agent:
    def __init__(self, idx: int, h: Harness) -> None:
        self.idx, self.h = idx, h
        self.stub: Any = None
        self.md: tuple = ()
        self.keys: dict[str, bytes] = {}
        self.model_hash = ""
        self.target = ""
        self.wake = asyncio.Event()
        self.interval = 5.0
        self.registered = False
        self.watching = asyncio.Event()
        self.uploaded = False
        self.synced = asyncio.Event()
        self.ready_sent = False
        self.notified_at: dict[str, float] = {}

    # --- helpers ----------------------------------------------------------------------------
    def _code(self, exc: Exception) -> str:
        import grpc

        if isinstance(exc, grpc.aio.AioRpcError):
            return exc.code().name
        if isinstance(exc, asyncio.TimeoutError):
            return "DEADLINE_EXCEEDED"
        return type(exc).__name__

    async def _backoff(self, exc: Exception, attempt: int) -> None:
        import grpc

        wait = min(30.0, 0.5 * 2 ** min(attempt, 6)) * (0.5 + random.random())
        if isinstance(exc, grpc.aio.AioRpcError):
            for k, v in exc.trailing_metadata() or ():
                if k == RETRY_AFTER_KEY and str(v).isdigit():
                    wait = max(wait, int(v) / 1000)
        await asyncio.sleep(wait)

    def _error(self, rpc: str, exc: Exception) -> None:
        key = f"{rpc}:{self._code(exc)}"
        if key not in self.h.stats.errors:  # the first of each kind, whole, in harness-<i>.log
            import traceback

            print(f"agent {self.idx}: {key}: " + "".join(traceback.format_exception(exc))[-3000:],
                  file=sys.stderr, flush=True)
        self.h.stats.errors[key] += 1

    def set_target(self, target: str, *, pushed: bool) -> None:
        if target and target != self.target:
            self.target = target
            self.notified_at.setdefault(target, time.time())
        if self.target and self.target != self.model_hash:
            self.wake.set()

    # --- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        from protos.edgeloop.v1 import fleet_pb2 as pb
        from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
        from shared import signing as sig

        self.stub = pb_grpc.EdgeFleetStub(self.h.channel_for(self.idx))
        req = pb.RegisterRequest(enrollment_token=self.h.cfg["enrollment_token"], hardware_id=f"sim-hw-{self.idx:06d}",
                                 name=f"sim-{self.idx}", tags=["sim"], agent_version="fleet-scale")
        attempt = 0
        while True:
            self.h.stats.calls["Register"] += 1
            try:
                async with self.h.register_slots:
                    resp = await self.stub.Register(req, timeout=60)
                break
            except Exception as exc:  # noqa: BLE001 - counted, retried
                self._error("Register", exc)
                attempt += 1
                await self._backoff(exc, attempt)
        self.md = (("authorization", f"Bearer {resp.device_credential}"),)
        self.keys = {sig.key_id(bytes(k)): bytes(k) for k in resp.signing_public_keys}
        self.interval = resp.heartbeat_interval_s or 5.0
        self.registered = True
        self.set_target(resp.target_model_hash, pushed=False)
        tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._watch()),
                 asyncio.create_task(self._updater())]
        await self._upload()
        await self.watching.wait()
        if self.target:
            await self.synced.wait()
        self.ready_sent = True
        self.h.ready += 1
        await asyncio.gather(*tasks)

    async def _heartbeats(self) -> None:
        from protos.edgeloop.v1 import fleet_pb2 as pb

        await asyncio.sleep(random.random() * self.interval)
        attempt = 0
        while True:
            t0 = time.monotonic()
            self.h.stats.calls["Heartbeat"] += 1
            try:
                resp = await self.stub.Heartbeat(
                    pb.HeartbeatRequest(model_hash=self.model_hash, active_subnet=-1, state="idle",
                                        samples_pending=0, metrics={"accuracy": 0.5}),
                    metadata=self.md, timeout=30)
                self.h.stats.heartbeats.append((time.time(), time.monotonic() - t0))
                self.interval = resp.heartbeat_interval_s or self.interval
                self.set_target(resp.target_model_hash, pushed=False)
                attempt = 0
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))
            except Exception as exc:  # noqa: BLE001
                self._error("Heartbeat", exc)
                attempt += 1
                await self._backoff(exc, attempt)

    async def _watch(self) -> None:
        from protos.edgeloop.v1 import fleet_pb2 as pb

        attempt = 0
        while True:
            self.h.stats.calls["WatchUpdates"] += 1
            try:
                call = self.stub.WatchUpdates(pb.WatchUpdatesRequest(model_hash=self.model_hash), metadata=self.md)
                async for msg in call:
                    attempt = 0
                    self.watching.set()
                    if not msg.keepalive:
                        self.set_target(msg.target_model_hash, pushed=True)
                await asyncio.sleep(random.random())  # the server ended the stream: reconnect
            except Exception as exc:  # noqa: BLE001
                self._error("WatchUpdates", exc)
                attempt += 1
                await self._backoff(exc, attempt)

    async def _upload(self) -> None:
        from protos.edgeloop.v1 import fleet_pb2 as pb

        samples = [pb.Sample(sample_id=sid, payload=payload, label=label, captured_at_unix_ms=int(time.time() * 1000))
                   for sid, payload, label in self.h.samples_of(self.idx)]
        if not samples:
            self.uploaded = True
            return
        attempt = 0
        while True:
            self.h.stats.calls["UploadSamples"] += 1
            try:
                async def requests():  # noqa: ANN202
                    yield pb.UploadSamplesRequest(samples=samples)

                resp = await self.stub.UploadSamples(requests(), metadata=self.md, timeout=60)
                if resp.rejected:
                    self.h.stats.errors[f"UploadSamples:rejected:{resp.rejected[0].reason[:60]}"] += len(resp.rejected)
                self.uploaded = True
                return
            except Exception as exc:  # noqa: BLE001
                self._error("UploadSamples", exc)
                attempt += 1
                await self._backoff(exc, attempt)

    async def _updater(self) -> None:
        attempt = 0
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.target and self.target != self.model_hash:
                target = self.target
                try:
                    await self._update_to(target)
                    attempt = 0
                    self.h.emit({"ev": "v", "a": self.idx, "m": self.model_hash, "t": time.time(),
                                 "tn": self.notified_at.get(target)})
                    self.synced.set()
                except VerifyError as exc:
                    self.h.stats.verify_failures += 1
                    self.h.stats.errors[f"verify:{str(exc)[:60]}"] += 1
                    attempt += 1
                    await asyncio.sleep(min(30.0, 2.0 * attempt))
                except Exception as exc:  # noqa: BLE001
                    self._error("GetUpdate", exc)
                    attempt += 1
                    await self._backoff(exc, attempt)

    async def _update_to(self, target: str) -> None:
        """``--initial-model preinstalled``: devices leave the factory with version 0 (one
        agent per harness process downloads and verifies it; the others hold the same bytes)."""
        if self.model_hash or self.h.cfg["initial_model"] != "preinstalled":
            return await self._fetch(target)
        if self.h.preinstall is None:
            self.h.preinstall = fut = asyncio.get_running_loop().create_future()
            try:
                await self._fetch(target)
            except BaseException as exc:
                self.h.preinstall = None
                fut.set_exception(exc)
                fut.exception()
                raise
            fut.set_result(self.model_hash)
            return None
        held = await asyncio.shield(self.h.preinstall)
        if held == target:
            self.model_hash = held
            return None
        return await self._fetch(target)

    async def _fetch(self, target: str) -> None:
        from protos.edgeloop.v1 import fleet_pb2 as pb
        from shared import signing as sig

        have = self.model_hash
        first = not have
        async with (self.h.sync_slots if first else _null()):
            for _hop in range(MAX_CHAIN):
                self.h.stats.calls["GetUpdate"] += 1
                call = self.stub.GetUpdate(pb.GetUpdateRequest(target_model_hash=target, have_model_hash=have),
                                           metadata=self.md, timeout=300)
                info = None
                digest = hashlib.sha256()
                received = 0
                kept: list[bytes] | None = None
                async for msg in call:
                    if msg.HasField("info"):
                        info = msg.info
                        if not info.artefact_sha256:  # up to date
                            self.model_hash = info.final_model_hash or target
                            return
                        if info.key_announcements:
                            self.keys, _refused = sig.apply_key_statements(
                                self.keys, [(bytes(a.statement), bytes(a.signature)) for a in info.key_announcements],
                                set())
                        statements = [(sig.artefact_statement(
                            artefact_sha256=info.artefact_sha256, encoding=info.encoding, size=info.artefact_size,
                            target_model_hash=info.target_model_hash, base_model_hash=info.base_model_hash or None,
                            key_id=s.key_id), bytes(s.signature)) for s in info.signatures]
                        try:
                            sig.verify_any(self.keys, statements)
                        except sig.SignatureError as exc:
                            raise VerifyError(f"signature: {exc}") from exc
                        if info.base_model_hash and info.base_model_hash != have:
                            raise VerifyError("diff for another base")
                        kept = None if self.h.decoder.has(info.artefact_sha256) else []
                        continue
                    if info is None or msg.chunk.offset != received:
                        raise VerifyError("chunk out of order")
                    digest.update(msg.chunk.data)
                    received += len(msg.chunk.data)
                    if kept is not None:
                        kept.append(msg.chunk.data)
                if info is None:
                    raise VerifyError("no UpdateInfo")
                self.h.stats.bytes_downloaded += received
                if received != info.artefact_size or digest.hexdigest() != info.artefact_sha256:
                    raise VerifyError("size or SHA-256 mismatch")
                decoded = await self.h.decoder.result(info.artefact_sha256, b"".join(kept) if kept is not None else None,
                                                      info.base_model_hash)
                if decoded.encoding != info.encoding or decoded.model_hash != info.target_model_hash:
                    raise VerifyError("artefact decodes to another model or encoding")
                have = decoded.model_hash
                if have == (info.final_model_hash or target):
                    self.model_hash = have
                    return
            raise VerifyError("chain too long")


class _null:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class Harness:
    """One harness process: agents ``idx`` with ``idx % procs == proc_index``."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.stats = HarnessStats()
        self.decoder = DecodeCache()
        self.ready = 0
        self.sync_slots = asyncio.Semaphore(cfg["sync_concurrency"])
        self.register_slots = asyncio.Semaphore(cfg["register_concurrency"])
        self.preinstall: asyncio.Future[str] | None = None
        self._channels: dict[int, Any] = {}
        self._samples: dict[int, list[tuple[str, bytes, int]]] = {}
        self.indices = list(range(cfg["proc_index"], cfg["agents"], cfg["procs"]))
        self._load_samples()

    def _load_samples(self) -> None:
        from shared.samples import encode_sample, sample_id

        k = self.cfg["samples_per_agent"]
        if k <= 0:
            return
        ds = load_bench_dataset(self.cfg["dataset"])
        n = len(ds.y_train)
        for i in self.indices:
            rows = []
            for j in range(k):
                r = (i * k + j) % n
                payload = encode_sample(ds.x_train[r])
                rows.append((sample_id(payload), payload, int(ds.y_train[r])))
            self._samples[i] = rows

    def samples_of(self, idx: int) -> list[tuple[str, bytes, int]]:
        return self._samples.get(idx, [])

    def channel_for(self, idx: int) -> Any:
        import grpc

        key = idx // self.cfg["agents_per_channel"]
        ch = self._channels.get(key)
        if ch is None:
            options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.keepalive_time_ms", 30_000),
                       ("grpc.keepalive_timeout_ms", 10_000), ("grpc.initial_reconnect_backoff_ms", 500),
                       ("grpc.max_reconnect_backoff_ms", 5_000),
                       # one TCP connection per channel, as separate devices have (gRPC otherwise
                       # shares a subchannel between channels with equal arguments)
                       ("grpc.use_local_subchannel_pool", 1)]
            ca = self.cfg.get("ca_pem")
            if ca:
                ch = grpc.aio.secure_channel(self.cfg["address"], grpc.ssl_channel_credentials(ca.encode()), options)
            else:
                ch = grpc.aio.insecure_channel(self.cfg["address"], options)
            self._channels[key] = ch
        return ch

    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(stop.set)),
                         daemon=True).start()
        agents = [Agent(i, self) for i in self.indices]
        rate = self.cfg["ramp_rate"]
        t0 = time.monotonic()

        async def start(a: Agent, k: int) -> None:
            await asyncio.sleep(max(0.0, t0 + (a.idx / rate if rate > 0 else 0) - time.monotonic()))
            await a.run()

        tasks = [asyncio.create_task(start(a, k)) for k, a in enumerate(agents)]
        announced = False
        while not stop.is_set():
            reg = sum(a.registered for a in agents)
            self.emit({"ev": "progress", "registered": reg, "ready": self.ready, "total": len(agents)})
            if self.ready == len(agents) and not announced:
                self.emit({"ev": "ready"})
                announced = True
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close(grace=None)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.emit({"ev": "stats", "heartbeats": [(round(t, 3), round(d, 5)) for t, d in self.stats.heartbeats],
                   "errors": dict(self.stats.errors), "calls": dict(self.stats.calls),
                   "bytes_downloaded": self.stats.bytes_downloaded, "decodes": self.decoder.decodes,
                   "verify_failures": self.stats.verify_failures, "channels": len(self._channels),
                   "registered": sum(a.registered for a in agents), "ready": self.ready,
                   "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024})


def child_main(cfg_json: str) -> None:
    raise_nofile()
    cfg = json.loads(cfg_json)
    asyncio.run(Harness(cfg).main())


# ================================== parent: server, phases ====================================


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class ServerMonitor(threading.Thread):
    """Samples the server's process tree (the server and any worker children) every 0.5 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._dead_cpu = 0.0
        self._seen: dict[int, float] = {}

    def cpu_s(self) -> float:
        import psutil

        total = 0.0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            procs = []
        live = {}
        for p in procs:
            try:
                t = p.cpu_times()
                live[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        for pid, last in self._seen.items():  # a child that exited keeps the time it used
            if pid not in live:
                self._dead_cpu += last
        self._seen = live
        total = sum(live.values()) + self._dead_cpu
        return total

    def run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
                self.samples.append({"t": time.time(), "cpu_s": self.cpu_s(), "rss_mb": rss / 2**20,
                                     "main_rss_mb": self.proc.memory_info().rss / 2**20,
                                     "threads": self.proc.num_threads(), "fds": self.proc.num_fds(),
                                     "procs": len(procs)})
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()

    def window(self, t0: float, t1: float) -> dict:
        """CPU as % of one core, peak RSS and threads between wall times t0 and t1."""
        inside = [s for s in self.samples if t0 <= s["t"] <= t1]
        if len(inside) < 2:
            return {"cpu_pct": None, "rss_mb_max": None, "threads_max": None}
        dt = inside[-1]["t"] - inside[0]["t"]
        return {"cpu_pct": round(100 * (inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / dt, 1) if dt > 0 else None,
                "cpu_s": round(inside[-1]["cpu_s"] - inside[0]["cpu_s"], 2),
                "rss_mb_max": round(max(s["rss_mb"] for s in inside), 1),
                "threads_max": max(s["threads"] for s in inside), "fds_max": max(s["fds"] for s in inside)}


class RestPoller(threading.Thread):
    """GETs REST_PATHS in turn (as an operator's console would), recording each latency."""

    def __init__(self, client: Any, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.client, self.period_s = client, period_s
        self.lat: list[tuple[float, str, float, int]] = []  # (wall time, path, seconds, status)
        self._stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = REST_PATHS[i % len(REST_PATHS)]
            i += 1
            t0 = time.monotonic()
            try:
                status = self.client.get(path).status_code
            except Exception:  # noqa: BLE001 - a timeout is a (bad) result too
                status = 0
            self.lat.append((time.time(), path, time.monotonic() - t0, status))
            self._stop.wait(self.period_s)

    def stop(self) -> None:
        self._stop.set()

    def summary(self, t0: float, t1: float) -> dict:
        rows = [r for r in self.lat if t0 <= r[0] <= t1]
        ms = [r[2] * 1000 for r in rows]
        per = {p: {"p50_ms": _r(pct([r[2] * 1000 for r in rows if r[1] == p], 50)),
                   "p99_ms": _r(pct([r[2] * 1000 for r in rows if r[1] == p], 99))} for p in REST_PATHS}
        return {"count": len(rows), "p50_ms": _r(pct(ms, 50)), "p99_ms": _r(pct(ms, 99)), "max_ms": _r(max(ms, default=None)),
                "non_200": sum(r[3] != 200 for r in rows), "per_path": per}


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _iso_to_epoch(s: str) -> float:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


class Child:
    def __init__(self, cfg: dict, log: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"),
                                     text=True, bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.progress: dict = {}
        self.ready = False
        self.verified: list[dict] = []
        self.stats: dict | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("ev")
            if kind == "progress":
                self.progress = ev
            elif kind == "ready":
                self.ready = True
            elif kind == "v":
                self.verified.append(ev)
            elif kind == "stats":
                self.stats = ev

    def stop(self, timeout: float = 60) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)


def wait_for(pred: Any, timeout: float, what: str, period: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    print(f"  gave up waiting for {what} after {timeout:.0f} s", flush=True)
    return False


def start_server(work: Path, args: argparse.Namespace, ds_shape: tuple, classes: int) -> tuple[subprocess.Popen, dict]:
    import httpx  # noqa: F401 - fail early without the server extra

    ready = work / "server.ready.json"
    env = {**os.environ, "EDGELOOP_INPUT_SHAPE": ",".join(map(str, ds_shape)), "EDGELOOP_NUM_CLASSES": str(classes)}
    for kv in args.server_env:
        k, _, v = kv.partition("=")
        env[k] = v
    tree = Path(args.server_root).resolve() if args.server_root else ROOT
    if args.server_root:  # another checkout of the project (e.g. `git archive` of a commit, for a baseline)
        env["PYTHONPATH"] = str(tree)
    log = open(work / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "server", "run", "--data-dir", str(work / "server"),
                             "--rest-port", "0", "--grpc-port", "0", "--ready-file", str(ready)],
                            env=env, stdout=log, stderr=log, start_new_session=True, cwd=str(tree))
    if not wait_for(lambda: ready.exists() or proc.poll() is not None, 180, "the server to start"):
        proc.kill()
        raise RuntimeError("server did not start")
    if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode}: {(work / 'server.log').read_text()[-2000:]}")
    time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_one(n: int, args: argparse.Namespace, ds_shape: tuple, classes: int) -> dict:
    import httpx

    from edgeloop.fleet import create_enrollment_token
    from server.domain.operators import read_bootstrap_token

    work = Path(tempfile.mkdtemp(prefix=f"fleet-scale-{n}-", dir=args.work_dir))
    print(f"\n=== N = {n} agents ({args.procs} harness process(es), {args.agents_per_channel} agent(s) per channel)"
          f" in {work}", flush=True)
    t_start = time.time()
    proc, ports = start_server(work, args, ds_shape, classes)
    result: dict = {"agents": n, "procs": args.procs, "agents_per_channel": args.agents_per_channel,
                    "initial_model": args.initial_model,
                    "work_dir": str(work)}
    mon = ServerMonitor(proc.pid)
    mon.start()
    children: list[Child] = []
    try:
        db_url = f"sqlite:///{(work / 'server' / 'edgeloop.db').resolve()}"
        token = create_enrollment_token(db_url, name="fleet-scale", max_uses=n)
        op = read_bootstrap_token(work / "server")
        tls = bool(ports.get("tls"))
        ca_pem = Path(ports["ca_file"]).read_text() if tls else ""
        verify: Any = ssl.create_default_context(cafile=ports["ca_file"]) if tls else False
        base = f"{'https' if tls else 'http'}://127.0.0.1:{ports['rest_port']}"
        rest = httpx.Client(base_url=base, verify=verify, timeout=30, headers={"Authorization": f"Bearer {op}"})
        poller_client = httpx.Client(base_url=base, verify=verify, timeout=30, headers={"Authorization": f"Bearer {op}"})
        result["tls"] = tls
        rest.get("/api/v1/devices?limit=1")  # the REST app warmed up before the idle RSS is read
        time.sleep(1.0)
        base_rss = mon.samples[-1]["rss_mb"] if mon.samples else None
        cfg = {"address": f"127.0.0.1:{ports['grpc_port']}", "ca_pem": ca_pem, "enrollment_token": token,
               "agents": n, "procs": args.procs, "agents_per_channel": args.agents_per_channel,
               "samples_per_agent": args.samples_per_agent, "dataset": args.dataset,
               "ramp_rate": args.ramp_rate, "sync_concurrency": max(1, args.sync_concurrency // args.procs),
               "register_concurrency": max(1, args.register_concurrency // args.procs),
               "initial_model": args.initial_model}
        t_ramp = time.time()
        for p in range(args.procs):
            children.append(Child({**cfg, "proc_index": p}, work / f"harness-{p}.log"))

        def ready_count() -> int:
            return sum(c.progress.get("ready", 0) for c in children)

        def registered() -> int:
            return sum(c.progress.get("registered", 0) for c in children)

        last = [0.0]

        def all_ready() -> bool:
            if time.monotonic() - last[0] > 10:
                last[0] = time.monotonic()
                print(f"  ramp: {registered()}/{n} registered, {ready_count()}/{n} ready", flush=True)
            if any(c.proc.poll() is not None for c in children):
                raise RuntimeError("a harness process exited: " + ", ".join(
                    (work / f"harness-{i}.log").read_text()[-500:] for i in range(args.procs)))
            return all(c.ready for c in children)

        ramp_ok = wait_for(all_ready, args.ramp_timeout, "every agent to be ready")
        t_connected = time.time()
        result["ramp"] = {"s": round(t_connected - t_ramp, 1), "registered": registered(), "ready": ready_count(),
                          "complete": ramp_ok}
        print(f"  ramp: {registered()} registered, {ready_count()} ready in {t_connected - t_ramp:.1f} s", flush=True)
        time.sleep(args.settle_s)  # a few heartbeat intervals of a connected, idle fleet
        t_settled = time.time()
        connected = mon.window(t_connected, t_settled)
        rss_connected = connected["rss_mb_max"]

        poller = RestPoller(poller_client)
        poller.start()
        t_trigger = time.time()
        body = {"method": args.method, "cohort": {"all": True}, "params": json.loads(args.round_params)}
        r = rest.post("/api/v1/rounds", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /rounds answered {r.status_code}: {r.text[:500]}")
        rid = r.json()["id"]
        rnd: dict = {}

        def round_over() -> bool:
            nonlocal rnd
            rr = rest.get(f"/api/v1/rounds/{rid}")
            if rr.status_code == 200:
                rnd = rr.json()
            return rnd.get("status") in ("done", "skipped", "failed")

        wait_for(round_over, args.round_timeout, "the round to finish", period=0.5)
        t_done = _iso_to_epoch(rnd["finished_at"]) if rnd.get("finished_at") else time.time()
        t_training_end = time.time()
        model = rnd.get("model_hash") or ""
        result["round"] = {"id": rid, "status": rnd.get("status"), "reason": rnd.get("reason", "")[:300],
                           "model_hash": model, "train_s": round(t_done - t_trigger, 1),
                           "params": body["params"], "method": args.method}
        print(f"  round {rnd.get('status')} {rnd.get('reason', '')[:100]} in {t_done - t_trigger:.1f} s", flush=True)

        def verified() -> list[dict]:
            return [v for c in children for v in c.verified if v["m"] == model]

        expected = ready_count()
        if model and rnd.get("status") == "done":
            wait_for(lambda: len({v["a"] for v in verified()}) >= n, args.deliver_timeout,
                     "every agent to verify the new version", period=0.25)
        t_delivered = time.time()
        poller.stop()
        ver = verified()
        by_agent: dict[int, float] = {}
        for v in ver:
            by_agent[v["a"]] = min(by_agent.get(v["a"], math.inf), v["t"])
        lat = [t - t_done for t in by_agent.values()]
        notify = [v["tn"] - t_done for v in ver if v.get("tn")]
        result["delivery"] = {
            "verified": len(by_agent), "missed": n - len(by_agent), "ready_before_round": expected,
            "s": _r(max(lat) if lat and len(by_agent) == n else None, 2),
            "p50_s": _r(pct(lat, 50), 2), "p90_s": _r(pct(lat, 90), 2), "max_s": _r(max(lat, default=None), 2),
            "notified_p50_s": _r(pct(notify, 50), 2), "notified_max_s": _r(max(notify, default=None), 2),
        }
        print(f"  delivery: {len(by_agent)}/{n} verified, last {result['delivery']['max_s']} s after done", flush=True)
        result["rest"] = {"training": poller.summary(t_trigger, t_training_end),
                          "delivery": poller.summary(t_training_end, t_delivered),
                          "round": poller.summary(t_trigger, t_delivered)}

        t_steady0 = time.time()
        time.sleep(args.steady_s)
        t_steady1 = time.time()
        steady = mon.window(t_steady0, t_steady1)
    finally:
        for c in children:
            c.stop()
        mon.stop()
        stop_server(proc)
        if args.work_dir is None:  # a temp dir of this run only; --work-dir keeps logs and databases
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    stats = [c.stats or {} for c in children]
    hb = [(t, d) for s in stats for t, d in s.get("heartbeats", [])]
    errors: dict[str, dict[str, int]] = defaultdict(dict)
    for s in stats:
        for k, v in s.get("errors", {}).items():
            rpc, _, code = k.partition(":")
            errors[rpc][code] = errors[rpc].get(code, 0) + v
    calls: Counter = Counter()
    for s in stats:
        calls.update(s.get("calls", {}))

    def hb_window(t0: float, t1: float) -> dict:
        ms = [d * 1000 for t, d in hb if t0 <= t <= t1]
        return {"count": len(ms), "p50_ms": _r(pct(ms, 50)), "p99_ms": _r(pct(ms, 99)), "max_ms": _r(max(ms, default=None))}

    steady_beats = sum(1 for t, _ in hb if t_steady0 <= t <= t_steady1)
    whole = mon.window(t_start, time.time())
    result.update({
        "heartbeat": {"all": hb_window(0, math.inf), "after_ramp": hb_window(t_connected, math.inf),
                      "ramp": hb_window(0, t_connected), "connected_idle": hb_window(t_connected, t_settled),
                      "round": hb_window(t_trigger, t_delivered), "steady": hb_window(t_steady0, t_steady1)},
        "errors": dict(errors), "calls": dict(calls),
        "server": {"idle_start_rss_mb": base_rss, "connected": connected,
                   "ramp": mon.window(t_ramp, t_connected), "round": mon.window(t_trigger, t_delivered),
                   "steady": steady, "rss_mb_max": whole["rss_mb_max"], "threads_max": whole["threads_max"],
                   "fds_max": whole["fds_max"],
                   "rss_per_agent_kb": _r((rss_connected - base_rss) * 1024 / n, 1)
                   if rss_connected and base_rss else None,
                   "cpu_ms_per_heartbeat_steady": _r(1000 * steady["cpu_s"] / steady_beats, 3)
                   if steady.get("cpu_s") is not None and steady_beats else None},
        "steady": {"s": round(t_steady1 - t_steady0, 1), "cpu_pct": steady["cpu_pct"], "heartbeats": steady_beats},
        "harness": {"cpu_s": round(sum(s.get("cpu_s", 0) for s in stats), 1),
                    "maxrss_mb": round(sum(s.get("maxrss_mb", 0) for s in stats), 1),
                    "channels": sum(s.get("channels", 0) for s in stats),
                    "decodes": sum(s.get("decodes", 0) for s in stats),
                    "bytes_downloaded": sum(s.get("bytes_downloaded", 0) for s in stats),
                    "verify_failures": sum(s.get("verify_failures", 0) for s in stats)},
    })
    result["targets"] = check_targets(result)
    return result


def check_targets(r: dict) -> dict:
    d, hb, rest = r.get("delivery", {}), r.get("heartbeat", {}).get("after_ramp", {}), r.get("rest", {}).get("round", {})
    srv = r.get("server", {})

    def le(x: float | None, bound: float) -> bool | None:
        return None if x is None else x <= bound

    return {"delivery_within_30s": le(d.get("s"), TARGETS["delivery_s"]), "zero_missed": d.get("missed") == 0,
            "heartbeat_p99": le(hb.get("p99_ms"), TARGETS["heartbeat_p99_ms"]),
            "rest_p99": le(rest.get("p99_ms"), TARGETS["rest_p99_ms"]),
            "server_rss": le(srv.get("rss_mb_max"), TARGETS["server_rss_mb"]),
            "steady_cpu": le(r.get("steady", {}).get("cpu_pct"), TARGETS["steady_cpu_pct"])}


def print_table(results: list[dict]) -> None:
    head = ("N", "ready", "deliver s", "missed", "hb p50", "hb p99", "REST p50", "REST p99", "CPU% round",
            "CPU% steady", "RSS MB", "threads", "errors")
    print("\n" + " ".join(f"{h:>10}" for h in head))
    for r in results:
        d, hb, rest = r.get("delivery", {}), r.get("heartbeat", {}).get("after_ramp", {}), r.get("rest", {}).get("round", {})
        srv = r.get("server", {})
        errs = sum(v for codes in r.get("errors", {}).values() for v in codes.values())
        row = (r["agents"], r.get("ramp", {}).get("ready"), d.get("max_s"), d.get("missed"), hb.get("p50_ms"),
               hb.get("p99_ms"), rest.get("p50_ms"), rest.get("p99_ms"), srv.get("round", {}).get("cpu_pct"),
               r.get("steady", {}).get("cpu_pct"), srv.get("rss_mb_max"), srv.get("threads_max"), errs)
        print(" ".join(f"{'-' if v is None else v!s:>10}" for v in row))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["agents"] for r in results]

    def series(f: Any) -> list[float]:
        out = []
        for r in results:
            try:
                v = f(r)
            except (KeyError, TypeError):
                v = None
            out.append(math.nan if v is None else v)
        return out

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("delivery s (round done -> all verified)", lambda r: r["delivery"]["max_s"], TARGETS["delivery_s"]),
        ("agents missed", lambda r: r["delivery"]["missed"], None),
        ("heartbeat ms (p50, p99)", None, TARGETS["heartbeat_p99_ms"]),
        ("REST ms during the round (p50, p99)", None, TARGETS["rest_p99_ms"]),
        ("server CPU % of one core (round, steady)", None, TARGETS["steady_cpu_pct"]),
        ("server RSS MB (max)", lambda r: r["server"]["rss_mb_max"], TARGETS["server_rss_mb"]),
    ]
    for ax, (title, f, target) in zip(axes.flat, panels, strict=True):
        if title.startswith("heartbeat"):
            ax.plot(ns, series(lambda r: r["heartbeat"]["after_ramp"]["p50_ms"]), "o-", label="p50")
            ax.plot(ns, series(lambda r: r["heartbeat"]["after_ramp"]["p99_ms"]), "s-", label="p99")
            ax.set_yscale("log")
            ax.legend()
        elif title.startswith("REST"):
            ax.plot(ns, series(lambda r: r["rest"]["round"]["p50_ms"]), "o-", label="p50")
            ax.plot(ns, series(lambda r: r["rest"]["round"]["p99_ms"]), "s-", label="p99")
            ax.set_yscale("log")
            ax.legend()
        elif title.startswith("server CPU"):
            ax.plot(ns, series(lambda r: r["server"]["round"]["cpu_pct"]), "o-", label="round")
            ax.plot(ns, series(lambda r: r["steady"]["cpu_pct"]), "s-", label="steady")
            ax.legend()
        else:
            ax.plot(ns, series(f), "o-")
        if target is not None:
            ax.axhline(target, color="red", ls="--", lw=1, label="target")
        ax.set(title=title, xlabel="agents")
        ax.grid(alpha=0.3)
    fig.suptitle("EdgeLoop fleet scale (real protocol, default server settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="100,1000,2000,5000", help="comma-separated fleet sizes (one fresh server each)")
    p.add_argument("--quick", action="store_true", help="300 agents (unless --agents), short phases")
    p.add_argument("--procs", type=int, default=1, help="harness processes (agents split between them)")
    p.add_argument("--agents-per-channel", type=int, default=1,
                   help="agents sharing one gRPC channel (TCP+TLS connection); 1 = one per agent, as devices")
    p.add_argument("--samples-per-agent", type=int, default=4)
    add_dataset_argument(p)
    p.add_argument("--method", default="dpu")
    p.add_argument("--round-params", default=json.dumps(DEFAULT_ROUND_PARAMS))
    p.add_argument("--ramp-rate", type=float, default=100.0, help="agents started per second")
    p.add_argument("--sync-concurrency", type=int, default=64, help="initial (version 0) downloads at once")
    p.add_argument("--register-concurrency", type=int, default=8,
                   help="Register calls in flight (all agents share 127.0.0.1, and the server limits "
                   "concurrent Register attempts per source address: register_burst, default 10)")
    p.add_argument("--initial-model", choices=("preinstalled", "download"), default="preinstalled",
                   help="version 0 on the devices: preinstalled (one agent per harness process downloads "
                   "and verifies it, the others start with it, as devices flashed at the factory) or "
                   "download (every agent fetches the full model at enrollment)")
    p.add_argument("--ramp-timeout", type=float, default=300.0)
    p.add_argument("--settle-s", type=float, default=10.0, help="idle connected fleet before the round")
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--deliver-timeout", type=float, default=120.0)
    p.add_argument("--steady-s", type=float, default=60.0, help="steady-state phase after delivery")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment (default: none, i.e. default settings)")
    p.add_argument("--server-root", default=None,
                   help="run the server from this project tree instead of this one (a baseline commit)")
    p.add_argument("--work-dir", default=None,
                   help="keep the per-N server directories (logs, databases) here (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/fleet_scale.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child)
        return []
    if args.quick:
        if args.agents == p.get_default("agents"):
            args.agents = "300"
        args.settle_s = min(args.settle_s, 6.0)
        args.steady_s = min(args.steady_s, 10.0)
        args.ramp_rate = max(args.ramp_rate, 200.0)
    try:
        sizes = [int(x) for x in args.agents.split(",") if x.strip()]
    except ValueError:
        fail(f"--agents {args.agents!r}: comma-separated integers")
    if not sizes or min(sizes) < 1 or args.procs < 1 or args.agents_per_channel < 1:
        fail("--agents, --procs and --agents-per-channel must be positive")
    try:
        json.loads(args.round_params)
    except ValueError:
        fail(f"--round-params is not JSON: {args.round_params!r}")
    ds = load_bench_dataset(args.dataset)
    nofile = raise_nofile()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    meta = {"server_root": args.server_root or str(ROOT), "command": " ".join(["bench/fleet_scale.py", *(argv if argv is not None else sys.argv[1:])]),
            "dataset": args.dataset, "cpus": os.cpu_count(), "nofile": nofile,
            "load_avg_at_start": os.getloadavg(), "targets": TARGETS,
            "note": "the harness runs beside the server on the same host (and other work shares it)",
            "started": datetime.now(timezone.utc).isoformat()}
    for n in sizes:
        try:
            results.append(run_one(n, args, ds.input_shape, ds.num_classes))
        except Exception as exc:  # noqa: BLE001 - a size that breaks is a result
            print(f"  N = {n} failed: {exc}", flush=True)
            results.append({"agents": n, "failed": str(exc)[:2000]})
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print_table([r for r in results if "failed" not in r])
    plot([r for r in results if "failed" not in r], args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}", flush=True)
    return results


if __name__ == "__main__":
    main()
