"""TLS material of the server: an operator's certificate, or a local CA and a server
certificate it issues, created on first start under ``<data_dir>/tls`` (docs/security.md).

Everything cryptographic is done by ``cryptography`` (keys, certificates, signatures) and by
gRPC's and uvicorn's own TLS stacks; this module only decides what to issue and when.

Files (``<data_dir>/tls``, directory 0700):
- ``ca.crt`` (0644) and ``ca.key`` (0600): the local CA, ECDSA P-256, valid 10 years. Agents pin
  this certificate (the file, or the SHA-256 fingerprint of its DER encoding). It is never
  replaced automatically: a new CA would lock every enrolled agent out.
- ``server.crt`` (0644: the server certificate followed by the CA certificate, so that an agent
  enrolling by fingerprint receives the CA in the handshake) and ``server.key`` (0600).
  Re-issued (new key, same CA; checked at start and hourly while running) when it expires
  within ``RENEW_BEFORE`` (a third of its validity if that is shorter), when the configured
  host names change, or when it was not issued by the CA on disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.store.durable import write_private_file

log = logging.getLogger(__name__)

CA_VALIDITY = dt.timedelta(days=3650)
RENEW_BEFORE = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clocks of agents that run a little behind
_KEY_MODE = 0o600


class TLSConfigError(RuntimeError):
    """The TLS files cannot be used as they are (the message says what to do)."""


@dataclass(frozen=True)
class ServerTLS:
    """What the listeners need: PEM chain and key (bytes and paths), and the CA agents pin."""

    cert_file: Path
    key_file: Path
    chain_pem: bytes
    key_pem: bytes
    ca_file: Path | None  # None: an operator-provided certificate whose CA we do not hold
    ca_fingerprint: str  # sha256 hex of the CA's DER ("" when ca_file is None)
    hostnames: tuple[str, ...]
    not_after: dt.datetime


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (what agents pin)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def tls_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tls"


def ca_paths(data_dir: Path) -> tuple[Path, Path]:
    d = tls_dir(data_dir)
    return d / "ca.crt", d / "ca.key"


def default_hostnames() -> list[str]:
    """localhost, the loopback addresses and this machine's host name (and FQDN)."""
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def configured_hostnames(text: str, bind_hosts: tuple[str, ...] = ()) -> list[str]:
    """The names the server certificate is issued for: ``text`` (comma separated) or the
    defaults, plus every bind address that is a specific IP (not a wildcard)."""
    names = [n.strip() for n in text.split(",") if n.strip()] or default_hostnames()
    for host in bind_hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_unspecified and str(ip) not in names:
            names.append(str(ip))
    return names


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _san_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (mode ``mode`` from creation; see
    :func:`server.store.durable.write_private_file`)."""
    write_private_file(path, data, mode=mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): set to 0600", path, mode)
        os.chmod(path, _KEY_MODE)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSConfigError(f"{path}: expected an ECDSA key")
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeLoop"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"EdgeLoop local CA {socket.gethostname()}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str],
                      days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_cert(ca_cert, ca_key, key.public_key(), names[0], _san(names),
                      ExtendedKeyUsageOID.SERVER_AUTH, days)
    return cert, key


def _leaf_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, public_key,
               common_name: str, san: x509.SubjectAlternativeName, usage: x509.ObjectIdentifier,
               days: int) -> x509.Certificate:
    """An end-entity certificate (server or client, by ``usage``) signed by the local CA; it
    never outlives the CA."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    """The local CA, created if there is none. Returns (certificate, key, created)."""
    d = tls_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    ca_crt, ca_key = ca_paths(data_dir)
    if ca_crt.exists():
        if not ca_key.exists():
            raise TLSConfigError(f"{ca_crt} exists but {ca_key} does not: restore the key, or move both away "
                                 "to create a new CA (every agent must then pin the new one)")
        cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        key = _load_key(ca_key)
        if not _same_key(cert, key):
            raise TLSConfigError(f"{ca_key} is not the key of {ca_crt}")
        if cert.not_valid_after_utc <= _now():
            raise TLSConfigError(f"the local CA {ca_crt} expired on {cert.not_valid_after_utc:%Y-%m-%d}: move "
                                 f"{d} away to create a new one and re-pin it on every agent")
        return cert, key, False
    # The key is written first and the certificate last: a crash in between leaves no
    # ca.crt, and the next start creates both again (nothing can pin a CA never shown).
    cert, key = _new_ca()
    write_atomic(ca_key, _key_pem(key), _KEY_MODE)
    write_atomic(ca_crt, _pem(cert), 0o644)
    log.info("created a local CA in %s", ca_crt)
    return cert, key, True


def _renew_reason(cert_file: Path, key_file: Path, ca_cert: x509.Certificate, names: list[str]) -> str:
    """Why the server certificate on disk must be re-issued ("" if it is fine)."""
    if not cert_file.exists() or not key_file.exists():
        return "none yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = _load_key(key_file)
    except ValueError as exc:
        return f"unreadable ({exc})"
    if not _same_key(cert, key):
        return "key does not match"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the CA on disk"
    if _san_names(cert) != set(names):
        return f"host names changed ({sorted(_san_names(cert))} -> {sorted(names)})"
    # RENEW_BEFORE, or a third of the validity for certificates shorter than 90 days.
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if cert.not_valid_after_utc - _now() < min(RENEW_BEFORE, lifetime / 3):
        return f"expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return ""


def ensure_server_tls(data_dir: Path, *, hostnames: list[str], cert_days: int,
                      cert_file: Path | None = None, key_file: Path | None = None) -> ServerTLS:
    """The TLS material to serve with: the operator's files when given, else the local CA's
    server certificate, issued or re-issued as needed."""
    if cert_file is not None or key_file is not None:
        return _operator_tls(cert_file, key_file)
    ca_cert, ca_key, _ = ensure_ca(data_dir)
    d = tls_dir(data_dir)
    crt, key = d / "server.crt", d / "server.key"
    reason = _renew_reason(crt, key, ca_cert, hostnames)
    if reason:
        cert, skey = issue_server_cert(ca_cert, ca_key, hostnames, cert_days)
        write_atomic(key, _key_pem(skey), _KEY_MODE)
        write_atomic(crt, _pem(cert) + _pem(ca_cert), 0o644)
        log.info("issued the server certificate (%s): %s, valid until %s", reason, ", ".join(hostnames),
                 f"{cert.not_valid_after_utc:%Y-%m-%d}")
    chain = crt.read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    return ServerTLS(crt, key, chain, key.read_bytes(), ca_paths(data_dir)[0], fingerprint(ca_cert),
                     tuple(hostnames), leaf.not_valid_after_utc)


def _operator_tls(cert_file: Path | None, key_file: Path | None) -> ServerTLS:
    if cert_file is None or key_file is None:
        raise TLSConfigError("set both tls_cert_file and tls_key_file, or neither (a local CA is used)")
    try:
        chain = cert_file.read_bytes()
        certs = x509.load_pem_x509_certificates(chain)
        key_pem = key_file.read_bytes()
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"cannot load the TLS certificate {cert_file} / key {key_file}: {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TLSConfigError(f"{key_file} is not the key of the first certificate in {cert_file}")
    # The last certificate of the chain is the CA agents pin, if the operator included it.
    last = certs[-1]
    ca_fp = fingerprint(last) if len(certs) > 1 and last.issuer == last.subject else ""
    return ServerTLS(cert_file, key_file, chain, key_pem, None, ca_fp, tuple(sorted(_san_names(certs[0]))),
                     certs[0].not_valid_after_utc)


def server_tls(settings) -> ServerTLS:  # noqa: ANN001 - ServerSettings (imports this module's users)
    """:func:`ensure_server_tls` for ``settings`` (a :class:`~server.settings.ServerSettings`)."""
    names = configured_hostnames(settings.tls_hostnames, (settings.rest_host, settings.grpc_host))
    return ensure_server_tls(settings.data_dir, hostnames=names, cert_days=settings.tls_cert_days,
                             cert_file=settings.tls_cert_file, key_file=settings.tls_key_file)


# --- client certificates for mutual TLS (docs/security.md#mutual-tls) -------------------------

CLIENT_CERT_DAYS = 90
MAX_CSR_BYTES = 4096


@dataclass(frozen=True)
class IssuedClientCert:
    pem: bytes
    fingerprint: str  # sha256 hex of the DER
    serial: str  # hex
    not_after: dt.datetime


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A device's CSR (PEM or DER), checked: self-signed correctly, an ECDSA P-256 key (what
    the reference agent makes; BoringSSL verifies it). Raises ValueError saying what is wrong."""
    if not data or len(data) > MAX_CSR_BYTES:
        raise ValueError(f"client_csr must be 1 to {MAX_CSR_BYTES} bytes")
    try:
        csr = (x509.load_pem_x509_csr(data) if data.lstrip().startswith(b"-----")
               else x509.load_der_x509_csr(data))
    except ValueError as exc:
        raise ValueError(f"client_csr is not a certificate signing request ({exc})") from exc
    if not csr.is_signature_valid:
        raise ValueError("client_csr's signature does not verify (the CSR must be signed by its own key)")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise ValueError("client_csr must carry an ECDSA P-256 public key")
    return csr


def issue_client_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      csr: x509.CertificateSigningRequest, device_id: str,
                      days: int = CLIENT_CERT_DAYS) -> IssuedClientCert:
    """A ``clientAuth`` certificate for ``device_id`` (CN and DNS SAN; the CSR's subject is
    ignored) over the CSR's key, signed by the local CA."""
    cert = _leaf_cert(ca_cert, ca_key, csr.public_key(), device_id,
                      x509.SubjectAlternativeName([x509.DNSName(device_id)]), ExtendedKeyUsageOID.CLIENT_AUTH, days)
    return IssuedClientCert(_pem(cert), fingerprint(cert), format(cert.serial_number, "x"), cert.not_valid_after_utc)


def peer_certificate(auth_context: dict) -> x509.Certificate | None:
    """The client certificate gRPC verified on a port that requires one (None elsewhere)."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return None
