"""Idle fleet on the agent server (issue 12 items 1-3): N agents, each registered, holding one
WatchUpdates stream and heartbeating every 5 s (random phase), against a real server
(`edgeloop server run`, default settings: TLS, SQLite, fsync) in a subprocess. Reports the
server's threads, CPU (share of one core, whole process tree) and RSS over the window, and
heartbeat latency p50/p99 and errors by status code as the agents see them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/agent_server_idle.py --agents 1000 --window-s 30
    # the server of another checkout (a baseline: `git archive HEAD | tar -x -C /tmp/old`):
    OMP_NUM_THREADS=1 .venv/bin/python bench/agent_server_idle.py --server-root /tmp/old --agents 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(work: Path, root: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    ready = work / "ready.json"
    env = {**os.environ, **env_extra}
    if root != ROOT:
        env["PYTHONPATH"] = str(root)
    log = open(work / "server.log", "ab")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "server", "run", "--data-dir", str(work / "server"),
                             "--rest-port", "0", "--grpc-port", "0", "--ready-file", str(ready)],
                            env=env, stdout=log, stderr=log, start_new_session=True, cwd=str(root))
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


class Tree:
    """CPU seconds, threads and RSS of the server's process tree (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)

    def procs(self) -> list:
        return [self.root, *self.root.children(recursive=True)]

    def cpu_s(self) -> float:
        total = 0.0
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return total

    def threads(self) -> int:
        return self.root.num_threads()  # the serving process (the worker child trains, not serves)

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self.procs()) / 2**20


async def fleet(address: str, ca_pem: bytes, token: str, n: int, window_s: float, tree: Tree) -> dict:
    import grpc

    from protos.edgeloop.v1 import fleet_pb2 as pb
    from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(ca_pem) if ca_pem else None
    channels = [grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
                for _ in range(max(1, n // 50))]  # 50 agents per connection
    stubs = [pb_grpc.EdgeFleetStub(c) for c in channels]
    errors: Counter = Counter()
    latencies: list[float] = []
    stop = asyncio.Event()
    measuring = asyncio.Event()
    watching = 0

    async def register(i: int) -> str:
        stub = stubs[i % len(stubs)]
        for _ in range(60):
            try:
                r = await stub.Register(pb.RegisterRequest(enrollment_token=token, hardware_id=f"idle-{i}"), timeout=60)
                return r.device_credential
            except grpc.aio.AioRpcError as exc:
                errors[f"Register {exc.code().name}"] += 1
                await asyncio.sleep(1 + random.random())
        raise RuntimeError("cannot register")

    async def watch(stub, md) -> None:
        nonlocal watching
        counted = False
        while not stop.is_set():
            try:
                call = stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=300), metadata=md)
                async for _msg in call:
                    if not counted:
                        counted = True
                        watching += 1
                    if stop.is_set():
                        call.cancel()
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors[f"WatchUpdates {exc.code().name}"] += 1
                await asyncio.sleep(1 + random.random())

    async def beat(stub, md) -> None:
        await asyncio.sleep(random.random() * 5)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(state="idle"), metadata=md, timeout=30)
                if measuring.is_set():
                    latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                if measuring.is_set():
                    errors[f"Heartbeat {exc.code().name}"] += 1
            await asyncio.sleep(5.0)

    sem = asyncio.Semaphore(8)  # concurrent Registers: the per-source limit takes a token per attempt (burst 10)

    async def reg(i: int) -> str:
        async with sem:
            return await register(i)

    t0 = time.monotonic()
    creds_list = await asyncio.gather(*(reg(i) for i in range(n)))
    reg_s = time.monotonic() - t0
    tasks = []
    for i, cred in enumerate(creds_list):
        md = (("authorization", f"Bearer {cred}"),)
        stub = stubs[i % len(stubs)]
        tasks += [asyncio.create_task(watch(stub, md)), asyncio.create_task(beat(stub, md))]
    await asyncio.sleep(10)  # ramp: every stream open, every agent past its first beat
    measuring.set()
    cpu0, w0 = tree.cpu_s(), time.monotonic()
    threads, rss = [], []
    while time.monotonic() - w0 < window_s:
        await asyncio.sleep(1)
        threads.append(tree.threads())
        rss.append(tree.rss_mb())
    cpu_pct = 100 * (tree.cpu_s() - cpu0) / (time.monotonic() - w0)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    return {"agents": n, "register_s": round(reg_s, 1), "streams_open": watching,
            "heartbeats": len(latencies), "heartbeat_p50_ms": pct(0.5), "heartbeat_p99_ms": pct(0.99),
            "server_threads_max": max(threads), "server_cpu_pct_of_one_core": round(cpu_pct, 1),
            "server_rss_mb_max": round(max(rss), 1), "errors": dict(errors)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--server-root", type=Path, default=ROOT)
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from edgeloop.fleet import create_enrollment_token

    work = Path(tempfile.mkdtemp(prefix="agent-idle-"))
    env = dict(kv.partition("=")[::2] for kv in args.server_env)
    env.setdefault("EDGELOOP_EMBEDDED_WORKER", "false")  # an idle fleet: no rounds
    proc, ports = start_server(work, args.server_root.resolve(), env)
    try:
        token = create_enrollment_token(f"sqlite:///{(work / 'server' / 'edgeloop.db').resolve()}",
                                        name="idle", max_uses=args.agents)
        ca_pem = Path(ports["ca_file"]).read_bytes() if ports.get("tls") else b""
        result = asyncio.run(fleet(f"127.0.0.1:{ports['grpc_port']}", ca_pem, token, args.agents, args.window_s,
                                   Tree(proc.pid)))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    result["server_root"] = str(args.server_root)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
