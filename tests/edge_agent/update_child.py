"""The agent's update path as its own process, for kill -9 loops (test_data_dir_bound.py).

    python -m tests.edge_agent.update_child ADDRESS AGENT_DIR CREDENTIAL MAX_DATA_DIR_BYTES

Builds what the daemon builds for updates (model store, runner, updater with the data-directory
budget, update machine on the same files) and drives it like the updater service: ask the
server for the target (a heartbeat), run the machine until it rests on that target, exit 0.
Exits 3 if an update fails (the reason on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_agent.client import FleetClient, TransientError
from edge_agent.disk_budget import DataDirBudget
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.probation import ProbationConfig
from edge_agent.runner import ModelRunner
from edge_agent.trust import TrustStore
from edge_agent.update_machine import UpdateContext, UpdateMachine
from edge_agent.update_state import WORKING, State, UpdateStateFile
from edge_agent.updater import Updater
from protos.edgeloop.v1 import fleet_pb2 as pb

CHUNK = 1024  # the server's minimum: many fsynced writes, so kills land mid-download
MAX_ROUNDS = 200


def main(address: str, agent_dir: Path, credential: str, max_bytes: int) -> int:
    client = FleetClient(address, timeout_s=10)
    client.credential = credential
    store, runner = ModelStore(agent_dir / "models"), ModelRunner()
    current = store.current()
    if current is not None:
        runner.load(current.arch, current.state, current.model_hash)
    updater = Updater(client, agent_dir, max_artefact_bytes=1 << 26, chunk_bytes=CHUNK,
                      trust=TrustStore(agent_dir), budget=DataDirBudget(agent_dir, max_bytes))
    local = LocalDataset(agent_dir / "local_data.db")
    machine = UpdateMachine(UpdateContext(updater, store, runner, local, ProbationConfig()),
                            UpdateStateFile(agent_dir / "update_state.json"))
    try:
        for _ in range(MAX_ROUNDS):
            try:
                target = client.heartbeat(pb.HeartbeatRequest(model_hash=runner.model_hash)).target_model_hash
                if machine.state not in WORKING:
                    if target == runner.model_hash or machine.rejected(target) is not None:
                        return 0
                    machine.start(target)
                state = machine.run(target)
            except TransientError:
                continue
            if state is State.FAILED:
                print(f"update failed: {machine.record.reason}", file=sys.stderr)
                return 3
        print("update did not settle", file=sys.stderr)
        return 4
    finally:
        client.close()
        local.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
