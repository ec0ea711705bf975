"""TLS on both ports (docs/security.md#tls-on-both-ports): the local CA and server certificate
on disk, and a real server (EdgeLoopServer on real loopback ports) that refuses plaintext and
foreign CAs on gRPC and serves REST over https. The agent side pins by file or fingerprint."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import stat
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from edge_agent.client import CredentialRejected, FleetClient, TLSError
from edge_agent.settings import AgentSettings
from edge_agent.tls import PinnedCA, TLSSetupError, normalise_fingerprint
from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.tls import (
    RENEW_BEFORE,
    TLSConfigError,
    ca_paths,
    ensure_server_tls,
    fingerprint,
    tls_dir,
)

NAMES = ["localhost", "127.0.0.1", "::1"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


# --- files ------------------------------------------------------------------------------------

def test_first_start_creates_a_ca_and_a_server_certificate_with_private_keys(tmp_path: Path) -> None:
    tls = ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    d = tls_dir(tmp_path)
    assert _mode(d) == 0o700
    assert _mode(d / "ca.key") == 0o600 and _mode(d / "server.key") == 0o600
    assert _mode(d / "ca.crt") == 0o644 and _mode(d / "server.crt") == 0o644
    assert not list(d.glob(".*tmp*")), "temporary files left behind"
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    leaf, chained_ca = x509.load_pem_x509_certificates(tls.chain_pem)
    assert chained_ca == ca  # the chain ends with the CA: agents can enroll by its fingerprint
    leaf.verify_directly_issued_by(ca)
    assert _sans(leaf) == set(NAMES)
    assert tls.ca_file == d / "ca.crt" and tls.ca_fingerprint == fingerprint(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # A second start changes nothing.
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert again.ca_fingerprint == tls.ca_fingerprint


def test_server_certificate_is_renewed_on_new_host_names_and_near_expiry_the_ca_stays(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    first = ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    ca_before = ca_paths(tmp_path)[0].read_bytes()
    renamed = ensure_server_tls(tmp_path, hostnames=[*NAMES, "edge.example.lan"], cert_days=365)
    assert renamed.chain_pem != first.chain_pem and renamed.key_pem != first.key_pem
    assert _sans(x509.load_pem_x509_certificate(renamed.chain_pem)) == {*NAMES, "edge.example.lan"}
    assert renamed.ca_fingerprint == first.ca_fingerprint and ca_paths(tmp_path)[0].read_bytes() == ca_before
    # A start 360 days later (within RENEW_BEFORE of the end): re-issued; a day earlier it was kept.
    import server.tls as tls_module

    real_now = tls_module._now
    for days, renewed in ((360 - RENEW_BEFORE.days, False), (360, True)):
        monkeypatch.setattr(tls_module, "_now", lambda d=days: real_now() + dt.timedelta(days=d))
        later = ensure_server_tls(tmp_path, hostnames=[*NAMES, "edge.example.lan"], cert_days=365)
        assert (later.chain_pem != renamed.chain_pem) == renewed, days
    assert later.not_after - real_now() > dt.timedelta(days=360 + 300)
    assert ca_paths(tmp_path)[0].read_bytes() == ca_before


def test_a_ca_whose_key_is_missing_or_foreign_is_refused_not_replaced(tmp_path: Path) -> None:
    ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    ensure_server_tls(tmp_path / "other", hostnames=NAMES, cert_days=30)
    ca_crt, ca_key = ca_paths(tmp_path)
    ca_key.write_bytes(ca_paths(tmp_path / "other")[1].read_bytes())
    with pytest.raises(TLSConfigError, match="is not the key of"):
        ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    ca_key.unlink()
    with pytest.raises(TLSConfigError, match="restore the key"):
        ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)


def test_a_readable_key_is_tightened(tmp_path: Path, caplog) -> None:
    ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    key = tls_dir(tmp_path) / "server.key"
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="server.tls"):
        ensure_server_tls(tmp_path, hostnames=NAMES, cert_days=30)
    assert _mode(key) == 0o600 and "readable by others" in caplog.text


def test_operator_certificate_files_are_used_as_given(tmp_path: Path) -> None:
    own = ensure_server_tls(tmp_path / "own", hostnames=["edge.example.lan"], cert_days=30)
    tls = ensure_server_tls(tmp_path / "data", hostnames=NAMES, cert_days=30, cert_file=own.cert_file,
                            key_file=own.key_file)
    assert tls.chain_pem == own.chain_pem and tls.ca_file is None and tls.ca_fingerprint == own.ca_fingerprint
    assert not tls_dir(tmp_path / "data").exists(), "no local CA when the operator brings a certificate"
    with pytest.raises(TLSConfigError, match="is not the key"):
        ensure_server_tls(tmp_path / "data", hostnames=NAMES, cert_days=30, cert_file=own.cert_file,
                          key_file=ca_paths(tmp_path / "own")[1])


# --- a real server ----------------------------------------------------------------------------

@pytest.fixture
def tls_server(server_settings):
    from server.app import EdgeLoopServer

    settings = server_settings.model_copy(update={"rest_port": 0, "grpc_port": 0, "embedded_worker": False,
                                                  "tls_hostnames": ",".join(NAMES)})
    server = EdgeLoopServer(settings)
    server.start()
    yield server
    server.stop()


def _heartbeat(client: FleetClient) -> None:
    client.credential = "not-a-device-credential"
    client.heartbeat(pb.HeartbeatRequest())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_grpc_refuses_plaintext_and_foreign_cas_and_accepts_the_pinned_one(tls_server, tmp_path) -> None:
    address = f"127.0.0.1:{tls_server.grpc_port}"
    # A plaintext client never reaches the service.
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EdgeFleetStub(channel).Heartbeat(pb.HeartbeatRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client pinning another CA refuses the server: a TLS error, retried like an outage.
    other = ensure_server_tls(tmp_path / "other", hostnames=NAMES, cert_days=30)
    foreign = FleetClient(address, timeout_s=10, tls=PinnedCA(ca_pem=other.ca_file.read_bytes()))
    try:
        with pytest.raises(TLSError, match="CERTIFICATE_VERIFY_FAILED"):
            _heartbeat(foreign)
    finally:
        foreign.close()
    # Pinning the server's CA file: the call reaches the servicer (which refuses the credential).
    pinned = FleetClient(address, timeout_s=10, tls=PinnedCA(ca_pem=tls_server.tls.ca_file.read_bytes()))
    try:
        with pytest.raises(CredentialRejected):
            _heartbeat(pinned)
    finally:
        pinned.close()
    # The name verified must be in the certificate: tls_server_name overrides the dialled host.
    for server_name, expected in (("not-in-the-cert.example", TLSError), ("localhost", CredentialRejected)):
        c = FleetClient(address, timeout_s=10, tls=PinnedCA(ca_pem=tls_server.tls.ca_file.read_bytes()),
                        server_name=server_name)
        try:
            with pytest.raises(expected):
                _heartbeat(c)
        finally:
            c.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fingerprint_pinning_fetches_and_stores_the_ca_and_a_wrong_one_is_refused(tls_server, tmp_path) -> None:
    address = f"127.0.0.1:{tls_server.grpc_port}"
    fp = tls_server.tls.ca_fingerprint
    agent_dir = tmp_path / "agent"
    settings = AgentSettings(server=address, data_dir=agent_dir, ca_fingerprint=":".join(
        fp[i:i + 2].upper() for i in range(0, 64, 2)))  # the colon form is accepted
    assert settings.ca_fingerprint == fp
    client = FleetClient(address, timeout_s=10, tls=PinnedCA.from_settings(settings))
    try:
        with pytest.raises(CredentialRejected):
            _heartbeat(client)
    finally:
        client.close()
    stored = agent_dir / "tls" / "ca.crt"
    assert stored.read_bytes() == tls_server.tls.ca_file.read_bytes()
    # The stored CA is used from now on: no fetch (a server that sends no chain would do).
    assert PinnedCA.from_settings(settings).root_certificates() == stored.read_bytes()

    wrong = settings.model_copy(update={"ca_fingerprint": "ab" * 32, "data_dir": tmp_path / "agent2"})
    client = FleetClient(address, timeout_s=10, tls=PinnedCA.from_settings(wrong))
    try:
        with pytest.raises(TLSError, match="none of the 2 certificates"):
            _heartbeat(client)
    finally:
        client.close()
    assert not (tmp_path / "agent2" / "tls" / "ca.crt").exists()


def test_agent_refuses_to_start_without_a_pinned_ca(tmp_path) -> None:
    with pytest.raises(TLSSetupError, match="no CA to verify the server"):
        PinnedCA.from_settings(AgentSettings(data_dir=tmp_path))
    not_a_ca = tmp_path / "leaf.pem"
    not_a_ca.write_bytes(ensure_server_tls(tmp_path / "s", hostnames=NAMES, cert_days=30).chain_pem)
    with pytest.raises(TLSSetupError, match="not a CA certificate"):
        PinnedCA.from_settings(AgentSettings(data_dir=tmp_path, ca_file=not_a_ca))
    with pytest.raises(ValueError, match="64 hex digits"):
        normalise_fingerprint("abc")


def test_agent_cli_refuses_to_start_without_a_pinned_ca(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from edgeloop.cli import app

    for key in [k for k in __import__("os").environ if k.startswith("EDGELOOP_AGENT_")]:
        monkeypatch.delenv(key)
    result = CliRunner().invoke(app, ["agent", "run", "--data-dir", str(tmp_path / "a"), "--status-port", "-1"])
    assert result.exit_code == 2
    assert "no CA to verify the server" in result.output and "--insecure" in result.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rest_is_served_over_https_with_the_ca(tls_server) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_server.tls.ca_file))
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_server.rest_port}", verify=ctx, timeout=10) as api:
        assert api.get("/healthz").status_code == 200
    with httpx.Client(base_url=f"https://127.0.0.1:{tls_server.rest_port}", timeout=10) as api:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            api.get("/healthz")  # the system's CAs do not know the local CA
    with httpx.Client(base_url=f"http://127.0.0.1:{tls_server.rest_port}", timeout=10) as api:
        with pytest.raises(httpx.HTTPError):
            api.get("/healthz")  # plaintext HTTP to the TLS port gets no answer


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_insecure_serves_plaintext_and_warns_at_every_start(server_settings, caplog) -> None:
    from server.app import EdgeLoopServer

    settings = server_settings.model_copy(update={"rest_port": 0, "grpc_port": 0, "embedded_worker": False,
                                                  "insecure": True})
    for _ in range(2):
        caplog.clear()
        server = EdgeLoopServer(settings)
        with caplog.at_level(logging.WARNING, logger="server.app"):
            server.start()
        try:
            assert any(r.levelno == logging.WARNING and "INSECURE" in r.getMessage() for r in caplog.records)
            with httpx.Client(base_url=f"http://127.0.0.1:{server.rest_port}", timeout=10) as api:
                assert api.get("/healthz").status_code == 200
        finally:
            server.stop()
    assert not tls_dir(settings.data_dir).exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_agent.tls"):
        assert PinnedCA.from_settings(AgentSettings(insecure=True)) is None
    assert "INSECURE" in caplog.text


def test_cli_tls_init_and_show_print_the_ca_fingerprint(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from edgeloop.cli import app

    monkeypatch.delenv("EDGELOOP_TLS_CERT_FILE", raising=False)
    runner = CliRunner()
    data = str(tmp_path / "server")
    missing = runner.invoke(app, ["server", "tls", "show", "--data-dir", data])
    assert missing.exit_code == 2 and "edgeloop server tls init" in missing.output
    created = runner.invoke(app, ["server", "tls", "init", "--data-dir", data, "--tls-hostnames", "edge.example.lan"])
    assert created.exit_code == 0, created.output
    ca = x509.load_pem_x509_certificate(ca_paths(tmp_path / "server")[0].read_bytes())
    shown = runner.invoke(app, ["server", "tls", "show", "--data-dir", data])
    assert shown.exit_code == 0, shown.output
    for out in (created.output, shown.output):
        assert f"CA sha256 fingerprint: {fingerprint(ca)}" in out
    assert "edge.example.lan" in created.output


def _served_leaf(port: int) -> x509.Certificate:
    """The certificate a fresh TLS connection to ``port`` is served (not verified: just read)."""
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_running_server_reissues_its_certificate_when_the_check_finds_it_due(tls_server, monkeypatch) -> None:
    """The start-up check re-runs at most every TLS_RECHECK_S on a running server (here made
    due by new host names; expiry is the same check, tested above): the next gRPC handshake
    is served the re-issued certificate, REST's next connections too, agents notice nothing."""
    import server.app as app_module

    before = _served_leaf(tls_server.grpc_port)
    assert _served_leaf(tls_server.rest_port) == before
    _served_leaf(tls_server.grpc_port)  # not due yet: nothing changes
    assert _served_leaf(tls_server.grpc_port) == before
    tls_server.settings = tls_server.settings.model_copy(update={"tls_hostnames": ",".join([*NAMES, "edge.lan"])})
    monkeypatch.setattr(app_module, "TLS_RECHECK_S", 0.0)
    _served_leaf(tls_server.grpc_port)
    after = _served_leaf(tls_server.grpc_port)
    assert after != before and "edge.lan" in _sans(after)
    assert _served_leaf(tls_server.rest_port) == after
    assert after == x509.load_pem_x509_certificate(tls_server.tls.chain_pem)
    client = FleetClient(f"127.0.0.1:{tls_server.grpc_port}", timeout_s=10,
                         tls=PinnedCA(ca_pem=tls_server.tls.ca_file.read_bytes()))
    try:
        with pytest.raises(CredentialRejected):
            _heartbeat(client)
    finally:
        client.close()
