"""End to end: a live agent refuses a tampered artefact and wrongly signed ones, keeps serving
its model, and reports why; then installs a correctly signed one (the control).

Server and agent are separate processes on loopback. The test plays an attacker who can write
the server's blob store and database (but does not hold the signing key): it plants a
self-consistent model version (blob, artefact row with the blob's real SHA-256 and size, model
version row, the device's target), so every hash check the agent makes would pass and only the
signature can stop it:

(a) tampered: the blob store holds the attacker's model, and the database carries a genuine
    signature by the server's key, moved over from version 0's artefact (it covers another
    statement);
(b) wrongly signed: signed by the attacker's own key (unknown to the agent), and by the
    attacker's key under the server's key id (a bad signature).

The control is signed with the server's key file, as a legitimate key holder would.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from server.db.engine import make_engine, make_session_factory, transaction
from server.db.models import Artefact, ArtefactSignatureRecord, Device, ModelVersion
from server.domain.operators import read_bootstrap_token
from server.store.blobs import BlobStore
from shared import signing as sig
from shared.artefacts import FULL_MODEL_ENCODING, encode_full_model
from shared.models import ArchSpec, build_model, init_weights_from_seed

SAMPLES = 120


class Attacker:
    """Writes the server's database and blob store directly, as a compromised host could."""

    def __init__(self, server_dir: Path) -> None:
        self.engine = make_engine(f"sqlite:///{(server_dir / 'edgeloop.db').resolve()}")
        self.factory = make_session_factory(self.engine)
        self.blobs = BlobStore(server_dir / "blobs", fsync=False)

    def plant(self, seed: int, sign) -> tuple[str, str]:
        """A new version from ``seed``, assigned to every device; ``sign(artefact)`` returns the
        (key_id, signature) rows to store with it. Returns its model hash and artefact SHA-256."""
        with transaction(self.factory) as s:
            v0 = s.scalars(select(ModelVersion).order_by(ModelVersion.number)).first()
            arch = ArchSpec.from_json(v0.arch_json)
            state = init_weights_from_seed(build_model(arch), seed).state_dict()
            data, digest = encode_full_model(arch, state, None)
            sha = self.blobs.put(data)  # the real SHA-256: the hash check alone would pass
            art = Artefact(sha256=sha, encoding=FULL_MODEL_ENCODING, size=len(data), base_model_hash=None,
                           target_model_hash=digest)
            s.add(art)
            s.flush()
            for key_id, signature in sign(s, art):
                s.add(ArtefactSignatureRecord(artefact_sha256=sha, key_id=key_id, signature=signature))
            s.add(ModelVersion(model_hash=digest, number=s.scalar(select(func.max(ModelVersion.number))) + 1,
                               parent_hash=None, arch_json=v0.arch_json, full_artefact_sha256=sha, method="full",
                               metrics={}, fleet_default=False))
            s.flush()
            for dev in s.scalars(select(Device)):
                dev.target_model_hash = digest
        return digest, sha

    def v0_signature(self, s, art: Artefact) -> list[tuple[str, bytes]]:
        v0 = s.scalars(select(ModelVersion).order_by(ModelVersion.number)).first()
        rows = s.scalars(select(ArtefactSignatureRecord).where(
            ArtefactSignatureRecord.artefact_sha256 == v0.full_artefact_sha256)).all()
        assert rows, "version 0 is not signed"
        return [(r.key_id, bytes(r.signature)) for r in rows]


def _stored(agent_dir: Path, model_hash: str) -> list[str]:
    """Files of the agent's data dir (models, downloads) that name ``model_hash``."""
    return [str(p) for p in agent_dir.rglob("*") if model_hash in p.name]


def _sign_with(key: Ed25519PrivateKey, claim: str | None = None):
    def sign(s, art: Artefact) -> list[tuple[str, bytes]]:
        kid, signature = sig.sign_artefact(key, artefact_sha256=art.sha256, encoding=art.encoding, size=art.size,
                                           target_model_hash=art.target_model_hash, base_model_hash=None)
        if claim is None:
            return [(kid, signature)]
        st = sig.artefact_statement(artefact_sha256=art.sha256, encoding=art.encoding, size=art.size,
                                    target_model_hash=art.target_model_hash, base_model_hash=None, key_id=claim)
        return [(claim, key.sign(st.message()))]

    return sign


def test_tampered_and_wrongly_signed_artefacts_are_refused_by_a_live_agent(
    start_server, start_agent, agent_http, wait_until, free_port, tmp_path
) -> None:
    # The attacker writes the database behind the server's back (no event reaches the server),
    # so only the agent server's periodic re-read (every 4 x keepalive) retargets the agent.
    server = start_server(EDGELOOP_HEARTBEAT_INTERVAL_S="0.5", EDGELOOP_WATCH_KEEPALIVE_S="1")
    status_port = free_port
    # Probation needs more labels than the agent will have: the control commits unjudged.
    agent = start_agent(server, "signed-0", samples=SAMPLES, status_port=status_port,
                        EDGELOOP_AGENT_PROBATION_MIN_SAMPLES="100000",
                        EDGELOOP_AGENT_PROBATION_SAMPLES="100000")
    procs = [server.proc, agent]
    attacker = Attacker(tmp_path / "server")
    server_key = sig.load_private_key_pem((tmp_path / "server" / "signing" / "ed25519.key").read_bytes())
    server_key_id = sig.key_id(sig.raw_public_key(server_key))
    intruder = Ed25519PrivateKey.generate()

    def agent_status() -> dict:
        try:
            code, body = agent_http(status_port, "GET", "/status")
        except ConnectionRefusedError:  # still starting (importing torch)
            return {"update_state": "", "model_hash": "", "target_model_hash": ""}
        assert code == 200, body
        return body

    try:
        admin = read_bootstrap_token(tmp_path / "server")  # the first-start admin token
        with server.api(headers={"Authorization": f"Bearer {admin}"}) as api:
            v0 = wait_until(lambda: (st := agent_status())["update_state"] == "committed" and st["model_hash"],
                            90, "the agent to install version 0", procs)
            device_id = api.get("/devices").json()["data"][0]["id"]
            pinned = (tmp_path / "signed-0" / "trusted_keys.json").read_text()
            assert server_key_id in pinned  # pinned at enrollment

            cases = {
                "tampered": (attacker.v0_signature, "does not verify"),
                "unknown key": (_sign_with(intruder), "untrusted keys"),
                "wrong key": (_sign_with(intruder, claim=server_key_id), "does not verify"),
            }
            for seed, (name, (sign, why)) in enumerate(cases.items(), start=100):
                evil, evil_sha = attacker.plant(seed, sign)
                # The refusal must name this artefact: for a moment after the target moves, the
                # status still shows the previous case's failure.
                st = wait_until(lambda: (st := agent_status())["target_model_hash"] == evil  # noqa: B023
                                and st["update_state"] == "failed"
                                and f"artefact {evil_sha[:12]} " in (st["last_error"] or "") and st,  # noqa: B023
                                60, f"the {name} refusal", procs)
                assert st["model_hash"] == v0, name  # still serving version 0
                assert "refused: signature: " in st["last_error"] and why in st["last_error"], st["last_error"]
                assert _stored(tmp_path / "signed-0", evil) == [], name  # nothing of it installed
                assert (tmp_path / "signed-0" / "trusted_keys.json").read_text() == pinned
                # ...and the server sees the refusal, on the device, with its reason.
                view = wait_until(lambda err=st["last_error"]: (d := api.get(f"/devices/{device_id}").json())
                                  ["last_error"] == err and d, 30, f"the {name} error at the server", procs)
                assert view["model_hash"] == v0 and view["update_state"] == "failed", name

            # Control: the same kind of planted version, signed by the server's own key, installs.
            good, _ = attacker.plant(200, _sign_with(server_key))
            wait_until(lambda: (st := agent_status())["model_hash"] == good and st["update_state"] == "committed",
                       60, "the correctly signed version to install", procs)
            assert _stored(tmp_path / "signed-0", good)
    finally:
        attacker.engine.dispose()
