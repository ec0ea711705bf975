"""Mutual TLS for agents (docs/security.md#mutual-tls), on a real EdgeLoopServer with
``mtls=true`` (real loopback ports): the first port serves only Register, which issues a client
certificate for the device's CSR; every other call must come over the mTLS port with a
certificate issued to the device whose credential it presents."""

from __future__ import annotations

import datetime as dt
import stat

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select

from edge_agent.client import FleetClient
from edge_agent.daemon import Agent
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource
from edge_agent.tls import ClientCertStore, PinnedCA
from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.db.engine import transaction
from server.db.models import Device, DeviceClientCertificate
from server.domain import enrollment
from server.tls import ensure_ca, fingerprint, issue_client_cert, load_csr
from tests.server.grpc_fleet import md

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
NAMES = "localhost,127.0.0.1,::1"


@pytest.fixture
def mtls_server(server_settings):
    from server.app import EdgeLoopServer

    settings = server_settings.model_copy(update={
        "rest_port": 0, "grpc_port": 0, "mtls": True, "mtls_port": 0, "embedded_worker": False,
        "tls_hostnames": NAMES, "device_rate_per_s": 0})
    server = EdgeLoopServer(settings)
    server.start()
    with transaction(server.ctx.factory) as s:
        server.enrollment_token = enrollment.create_token(s, name="mtls", max_uses=100).secret
    yield server
    server.stop(0)


def _ca_pem(server) -> bytes:
    return server.tls.ca_file.read_bytes()


def _channel(server, port: int, key_pem: bytes | None = None, cert_pem: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(_ca_pem(server), private_key=key_pem, certificate_chain=cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def _register(server, store: ClientCertStore, hw: str) -> pb.RegisterResponse:
    with _channel(server, server.grpc_port) as ch:
        resp = pb_grpc.EdgeFleetStub(ch).Register(pb.RegisterRequest(
            enrollment_token=server.enrollment_token, hardware_id=hw, client_csr=store.new_csr()), timeout=10)
    store.install(resp.client_certificate, resp.mtls_port)
    return resp


def _heartbeat(server, port: int, credential: str, key_pem=None, cert_pem=None) -> pb.HeartbeatResponse:
    with _channel(server, port, key_pem, cert_pem) as ch:
        return pb_grpc.EdgeFleetStub(ch).Heartbeat(pb.HeartbeatRequest(), metadata=md(credential), timeout=10)


def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


def _own_ca_cert(tmp_path, device_id: str) -> tuple[bytes, bytes]:
    """A key and a certificate naming ``device_id`` from a CA that is not the server's."""
    ca_cert, ca_key, _ = ensure_ca(tmp_path / "rogue")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    issued = issue_client_cert(ca_cert, ca_key, csr, device_id)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, issued.pem


def test_register_issues_a_device_certificate_and_only_the_mtls_port_serves_calls(mtls_server, tmp_path):
    server = mtls_server
    assert server.mtls_port and server.mtls_port != server.grpc_port
    store = ClientCertStore(tmp_path / "a")
    resp = _register(server, store, "hw-a")
    assert resp.mtls_port == server.mtls_port
    cert = x509.load_pem_x509_certificate(resp.client_certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == resp.device_id
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [resp.device_id]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(_ca_pem(server)))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=90) <= lifetime <= dt.timedelta(days=90, minutes=6)
    assert stat.S_IMODE(store.key_file.stat().st_mode) == 0o600
    with transaction(server.ctx.factory) as s:
        row = s.get(DeviceClientCertificate, fingerprint(cert))
        assert row.device_id == resp.device_id and row.serial == format(cert.serial_number, "x")
    key_pem, cert_pem, _, _ = store.load()
    cred = resp.device_credential

    # The mTLS port with the certificate and the credential: served.
    _heartbeat(server, server.mtls_port, cred, key_pem, cert_pem)
    # The first port serves only Register: the credential alone is refused, naming the port.
    detail = _refused(lambda: _heartbeat(server, server.grpc_port, cred), grpc.StatusCode.UNAUTHENTICATED)
    assert f"port {server.mtls_port}" in detail
    # Without a client certificate, or with one from another CA, the handshake fails.
    _refused(lambda: _heartbeat(server, server.mtls_port, cred), grpc.StatusCode.UNAVAILABLE)
    rogue_key, rogue_cert = _own_ca_cert(tmp_path, resp.device_id)
    _refused(lambda: _heartbeat(server, server.mtls_port, cred, rogue_key, rogue_cert), grpc.StatusCode.UNAVAILABLE)
    # Register without a CSR is refused before anything is issued.
    with _channel(server, server.grpc_port) as ch:
        detail = _refused(lambda: pb_grpc.EdgeFleetStub(ch).Register(pb.RegisterRequest(
            enrollment_token=server.enrollment_token, hardware_id="hw-nocsr"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT)
    assert "client_csr" in detail
    with transaction(server.ctx.factory) as s:
        assert s.scalars(select(Device).where(Device.hardware_id == "hw-nocsr")).first() is None


def test_a_certificate_only_works_with_its_own_device_and_until_revoked(mtls_server, tmp_path):
    server = mtls_server
    a_store, b_store = ClientCertStore(tmp_path / "a"), ClientCertStore(tmp_path / "b")
    a, b = _register(server, a_store, "hw-a"), _register(server, b_store, "hw-b")
    a_key, a_cert, _, _ = a_store.load()
    b_key, b_cert, _, _ = b_store.load()
    # A's certificate with B's credential (and the other way round): refused.
    detail = _refused(lambda: _heartbeat(server, server.mtls_port, b.device_credential, a_key, a_cert),
                      grpc.StatusCode.UNAUTHENTICATED)
    assert f"not issued to device {b.device_id}" in detail
    _refused(lambda: _heartbeat(server, server.mtls_port, a.device_credential, b_key, b_cert),
             grpc.StatusCode.UNAUTHENTICATED)
    _heartbeat(server, server.mtls_port, b.device_credential, b_key, b_cert)

    # Renewal: a new key's certificate over the mTLS port; the old one keeps working until it expires.
    with _channel(server, server.mtls_port, b_key, b_cert) as ch:
        renewed = pb_grpc.EdgeFleetStub(ch).RenewClientCertificate(
            pb.RenewClientCertificateRequest(csr=b_store.new_csr()), metadata=md(b.device_credential), timeout=10)
    b_store.install(renewed.client_certificate)
    nb_key, nb_cert, _, _ = b_store.load()
    assert nb_cert != b_cert
    _heartbeat(server, server.mtls_port, b.device_credential, nb_key, nb_cert)
    _heartbeat(server, server.mtls_port, b.device_credential, b_key, b_cert)
    # Renewal is not served on the first port (a stolen credential alone cannot get a certificate).
    with _channel(server, server.grpc_port) as ch:
        _refused(lambda: pb_grpc.EdgeFleetStub(ch).RenewClientCertificate(
            pb.RenewClientCertificateRequest(csr=b_store.new_csr()), metadata=md(b.device_credential), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(ValueError, match="P-256"):
        key = ec.generate_private_key(ec.SECP384R1())
        load_csr(x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                 .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    # A revoked device's certificate stops working at its next call.
    with transaction(server.ctx.factory) as s:
        s.get(Device, a.device_id).revoked = True
    detail = _refused(lambda: _heartbeat(server, server.mtls_port, a.device_credential, a_key, a_cert),
                      grpc.StatusCode.UNAUTHENTICATED)
    assert "revoked" in detail
    # Re-registering replaces the device's certificates: the old one is refused.
    old_key, old_cert = nb_key, nb_cert
    b2 = _register(server, b_store, "hw-b")
    assert b2.device_id == b.device_id
    detail = _refused(lambda: _heartbeat(server, server.mtls_port, b2.device_credential, old_key, old_cert),
                      grpc.StatusCode.UNAUTHENTICATED)
    assert "replaced" in detail
    key_pem, cert_pem, _, _ = b_store.load()
    _heartbeat(server, server.mtls_port, b2.device_credential, key_pem, cert_pem)


def test_the_agent_registers_gets_a_certificate_renews_it_and_works_over_mtls(mtls_server, tmp_path, wait_until):
    server = mtls_server
    settings = AgentSettings(server=f"127.0.0.1:{server.grpc_port}", data_dir=tmp_path / "agent",
                             ca_file=server.tls.ca_file, enrollment_token=server.enrollment_token, status_port=-1,
                             battery=False, load_budget=False, heartbeat_interval_s=0.2, backoff_initial_s=0.05,
                             backoff_max_s=0.5, upload_mode="none")
    source = DatasetShardSource(np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), rate_per_s=1.0, seed=0)
    agent = Agent(settings, source=source)
    agent.start()
    try:
        wait_until(lambda: agent.conn.registered and agent.conn.connected, 30, "the agent to come online")
        device_id = agent.conn.identity.device_id
        with transaction(server.ctx.factory) as s:
            first_seen = s.get(Device, device_id).last_seen_at
        wait_until(lambda: _last_seen(server, device_id) != first_seen, 30, "a heartbeat over mTLS")
    finally:
        agent.stop()
    tls_dir = tmp_path / "agent" / "tls"
    assert stat.S_IMODE((tls_dir / "client.key").stat().st_mode) == 0o600
    assert agent.conn.client._mtls is not None  # its calls went to the mTLS port
    # Renewal by the client, due at once here (renew_at=0): the next call renews, then uses the new one.
    store = ClientCertStore(tls_dir, renew_at=0.0)
    before = store.load()[1]
    client = FleetClient(settings.server, timeout_s=10, tls=PinnedCA.from_settings(settings), client_cert=store)
    client.credential = agent.conn.identity.credential
    try:
        client.heartbeat(pb.HeartbeatRequest())
        after = store.load()[1]
        assert after != before
        client.heartbeat(pb.HeartbeatRequest())
    finally:
        client.close()
    with transaction(server.ctx.factory) as s:
        rows = s.scalars(select(DeviceClientCertificate).where(DeviceClientCertificate.device_id == device_id)).all()
    assert len(rows) == 2 and all(r.revoked_at is None for r in rows)


def _last_seen(server, device_id: str):
    with transaction(server.ctx.factory) as s:
        return s.get(Device, device_id).last_seen_at
