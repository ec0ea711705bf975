"""The CA the agent pins for its gRPC channel (docs/security.md#tls-on-both-ports).

Three ways, in order of precedence:
- ``ca_file``: a PEM file (the server's ``<data_dir>/tls/ca.crt``, copied to the device).
- ``ca_fingerprint``: the SHA-256 of the CA's DER encoding (``edgeloop server tls show``).
  On first contact the agent opens one TLS connection *without* verification only to read
  the certificates the server sends (the generated server chain ends with its CA), keeps the
  one whose fingerprint matches, and stores it in ``<data_dir>/tls/ca.crt``; every RPC then
  runs over a channel that verifies the server against that CA. A man in the middle cannot
  produce a certificate with the pinned fingerprint, so the unverified read gains it nothing.
- neither, and ``insecure`` off: the agent refuses to start.

Verification itself is gRPC's (BoringSSL); parsing is ``cryptography``'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class TLSSetupError(RuntimeError):
    """The agent cannot build a pinned TLS channel from its settings (refuses to start)."""


def normalise_fingerprint(text: str) -> str:
    """``sha256:AB:CD...`` / ``abcd...`` -> 64 lowercase hex digits (ValueError otherwise)."""
    fp = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"ca_fingerprint must be the 64 hex digits of a SHA-256 (colons allowed), got {text!r}")
    return fp


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _ca_cert(pem: bytes, where: str) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise TLSSetupError(f"{where}: not a PEM certificate ({exc})") from exc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise TLSSetupError(f"{where}: not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert


def _fingerprint_of(cert: x509.Certificate) -> str:
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _unverified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """DER certificates the peer sent. Public API from Python 3.13; 3.10-3.12 have the same
    method on the underlying ``_ssl`` object."""
    public = getattr(sock, "get_unverified_chain", None)
    if public is not None:
        return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in public()]  # type: ignore[attr-defined]
    inner = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    if inner is None:
        raise TLSSetupError("this Python cannot read the server's certificate chain: set ca_file instead of ca_fingerprint")
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in inner() or []]  # type: ignore[attr-defined]


def fetch_ca(server: str, fp: str, timeout_s: float) -> bytes:
    """The PEM CA certificate among those ``server`` (host:port) sends whose SHA-256 is ``fp``.
    Raises OSError (network; retry later) or :class:`CAFingerprintMismatch`."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # read-only: what is read is accepted only by its fingerprint
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=timeout_s) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        chain = _unverified_chain(tls)
    for der in chain:
        if der_fingerprint(der) == fp:
            pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            _ca_cert(pem, f"the certificate of {server} with fingerprint {fp[:16]}...")
            return pem
    raise CAFingerprintMismatch(
        f"none of the {len(chain)} certificates {server} sent has the pinned CA fingerprint {fp}: "
        "wrong server, wrong fingerprint, or a server certificate chain without its CA")


class CAFingerprintMismatch(OSError):
    """The server sent no certificate with the pinned fingerprint (logged; retried with backoff)."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PinnedCA:
    """The root certificates of the agent's channel; :meth:`root_certificates` may fetch the
    CA by fingerprint on first use (raises OSError while that fails)."""

    def __init__(self, *, ca_pem: bytes | None = None, fingerprint: str = "", store: Path | None = None,
                 server: str = "", timeout_s: float = 10.0) -> None:
        self._pem = ca_pem
        self._fp = fingerprint
        self._store = store
        self._server = server
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> PinnedCA | None:  # noqa: ANN001 - AgentSettings
        """None when ``settings.insecure`` (plaintext); raises TLSSetupError when nothing is pinned."""
        s = settings
        if s.insecure:
            log.warning("INSECURE: TLS is off (--insecure / EDGELOOP_AGENT_INSECURE): the gRPC channel is "
                        "plaintext; the enrollment token and the device credential cross the network readable")
            return None
        fp = normalise_fingerprint(s.ca_fingerprint) if s.ca_fingerprint else ""
        if s.ca_file is not None:
            try:
                pem = Path(s.ca_file).read_bytes()
            except OSError as exc:
                raise TLSSetupError(f"ca_file {s.ca_file}: {exc.strerror or exc}") from exc
            cert = _ca_cert(pem, f"ca_file {s.ca_file}")
            if fp and _fingerprint_of(cert) != fp:
                raise TLSSetupError(f"ca_file {s.ca_file} has fingerprint {_fingerprint_of(cert)}, not the "
                                    f"configured ca_fingerprint {fp}")
            return cls(ca_pem=pem)
        if fp:
            store = Path(s.data_dir) / "tls" / "ca.crt"
            stored = None
            if store.exists():
                cert = _ca_cert(store.read_bytes(), str(store))
                if _fingerprint_of(cert) == fp:
                    stored = store.read_bytes()
                else:
                    log.warning("%s is not the CA with the configured fingerprint: fetching it again", store)
            return cls(ca_pem=stored, fingerprint=fp, store=store, server=s.server, timeout_s=s.rpc_timeout_s)
        raise TLSSetupError("no CA to verify the server with: set ca_file (the server's <data_dir>/tls/ca.crt) or "
                            "ca_fingerprint (`edgeloop server tls show`), or run with --insecure on a trusted "
                            "test network (EDGELOOP_AGENT_CA_FILE / EDGELOOP_AGENT_CA_FINGERPRINT / "
                            "EDGELOOP_AGENT_INSECURE)")

    def root_certificates(self) -> bytes:
        with self._lock:
            if self._pem is None:
                pem = fetch_ca(self._server, self._fp, self._timeout_s)
                if self._store is not None:
                    _write_atomic(self._store, pem)
                log.info("pinned the server's CA (sha256 %s), stored in %s", self._fp, self._store)
                self._pem = pem
            return self._pem
