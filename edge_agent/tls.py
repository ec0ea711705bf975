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


def _read_stored_ca(store: Path) -> bytes | None:
    """The CA pinned earlier by fingerprint, or None if none was stored yet. A stored file that
    cannot be read or is not a CA certificate (disk corruption, tampering) stops the agent:
    re-fetching silently would hide it, and only the operator can tell which it was."""
    try:
        pem = store.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TLSSetupError(f"the pinned CA {store} cannot be read ({exc.strerror or exc}): fix its "
                            "permissions, or delete it to fetch the CA again by ca_fingerprint") from exc
    try:
        _ca_cert(pem, str(store))
    except TLSSetupError as exc:
        raise TLSSetupError(f"the pinned CA is corrupt: {exc}; the agent will not fetch it again on its own: "
                            f"check the device's storage, then delete {store} to fetch the CA again by "
                            "ca_fingerprint (or set ca_file)") from exc
    return pem


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
            stored = _read_stored_ca(store)
            if stored is not None and _fingerprint_of(_ca_cert(stored, str(store))) != fp:
                # A valid CA under another fingerprint: the operator re-pinned (CA rotation).
                log.warning("%s is not the CA with the configured fingerprint: fetching it again", store)
                stored = None
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


# --- mutual TLS: the device's client certificate (docs/security.md#mutual-tls) ----------------

RENEW_AT = 2 / 3  # of a client certificate's lifetime


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file created O_EXCL with ``mode`` (a key is never readable by others), fsynced,
    renamed, directory fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class ClientCertStore:
    """The device's mTLS key and certificate under ``<data_dir>/tls``: ``client.key`` (0600,
    ECDSA P-256, made here; the private key never leaves the device), ``client.crt`` (issued by
    the server's CA) and ``client.json`` (the server's mTLS port). A new key is made for each
    CSR and kept as ``client.key.next`` until its certificate arrives."""

    def __init__(self, directory: Path, *, renew_at: float = RENEW_AT) -> None:
        self.dir = Path(directory)
        self.renew_at = renew_at  # renew once this fraction of the lifetime has passed
        self.key_file = self.dir / "client.key"
        self.cert_file = self.dir / "client.crt"
        self.port_file = self.dir / "client.json"
        self._next = self.dir / "client.key.next"
        self._lock = threading.Lock()

    def new_csr(self) -> bytes:
        """A CSR (PEM) for a fresh key, stored as the pending key."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        with self._lock:
            _write_private(self._next, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        # The server sets the subject (the device id); this one only names the request.
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeloop-agent")]))
               .sign(key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM)

    def install(self, cert_pem: bytes, mtls_port: int | None = None) -> x509.Certificate:
        """Stores the certificate issued for the pending key (which becomes the key), and the
        port. Raises TLSSetupError when it is not a certificate for the pending key."""
        import json

        with self._lock:
            try:
                cert = x509.load_pem_x509_certificate(cert_pem)
                key = serialization.load_pem_private_key(self._next.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise TLSSetupError(f"client certificate from the server cannot be installed: {exc}") from exc
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
                raise TLSSetupError("the server's client certificate is not for the key this device sent")
            if mtls_port is not None:
                _write_private(self.port_file, json.dumps({"mtls_port": int(mtls_port)}).encode())
            # Certificate, then key: a crash between leaves a pair that does not match, which
            # load() treats as none (the agent registers again), never a wrong pair in use.
            _write_private(self.cert_file, cert_pem, 0o644)
            os.replace(self._next, self.key_file)
            return cert

    def discard_pending(self) -> None:
        self._next.unlink(missing_ok=True)

    def clear(self) -> None:
        for p in (self.key_file, self.cert_file, self.port_file, self._next):
            p.unlink(missing_ok=True)

    def load(self) -> tuple[bytes, bytes, int, x509.Certificate] | None:
        """(key PEM, certificate PEM, mTLS port, certificate), or None without a usable pair."""
        import json

        with self._lock:
            try:
                key_pem, cert_pem = self.key_file.read_bytes(), self.cert_file.read_bytes()
                port = int(json.loads(self.port_file.read_text())["mtls_port"])
                cert = x509.load_pem_x509_certificate(cert_pem)
                key = serialization.load_pem_private_key(key_pem, password=None)
            except (OSError, ValueError, KeyError, TypeError):
                return None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki) or not 0 < port < 65536:
            return None
        import datetime as dt

        if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
            # The handshake would fail (a TLS error retried for ever): without a certificate the
            # first port answers UNAUTHENTICATED and the agent registers again for a new one.
            log.warning("client certificate %s expired on %s", self.cert_file, f"{cert.not_valid_after_utc:%Y-%m-%d}")
            return None
        return key_pem, cert_pem, port, cert

    def renewal_due(self, cert: x509.Certificate, now=None) -> bool:  # noqa: ANN001 - datetime
        import datetime as dt

        now = now or dt.datetime.now(dt.timezone.utc)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return now >= start + (end - start) * self.renew_at
