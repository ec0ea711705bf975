#!/usr/bin/env python3
"""Container health check: ``edgeloop-healthcheck server|agent``; exit 0 when healthy.

Used by the Dockerfiles' HEALTHCHECK and docker-compose.yml. Standard library only (the
slim images carry no curl). Host and port come from the same environment variables the
process itself reads, so a changed port cannot silently break the probe; the defaults
below must equal the settings defaults (tests/test_deploy.py checks that).

- server: GET /healthz on the REST API; 200 means the API answers and the database does.
  The API is https unless EDGELOOP_INSECURE is true: the probe verifies the certificate
  against the server's local CA (<EDGELOOP_DATA_DIR>/tls/ca.crt) or the configured chain
  (EDGELOOP_TLS_CERT_FILE), but not the host name (a loopback probe of the process's own
  port, which may be certified for other names only). It sends no credential.
- agent: GET /healthz on the local status endpoint; 200 means the daemon is running.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

# role -> (host variable, default host, port variable, default port, path)
TARGETS = {
    "server": ("EDGELOOP_REST_HOST", "127.0.0.1", "EDGELOOP_REST_PORT", 8000, "/healthz"),
    "agent": ("EDGELOOP_AGENT_STATUS_HOST", "127.0.0.1", "EDGELOOP_AGENT_STATUS_PORT", 8471, "/healthz"),
}
# A wildcard bind is probed on the loopback address of its family.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
# Defaults of the server settings the TLS decision reads (tests/test_deploy.py checks them).
SERVER_DATA_DIR_DEFAULT = ".edgeloop/server"
TRUE = {"1", "true", "yes", "on"}


def server_tls(env: dict[str, str]) -> bool:
    return env.get("EDGELOOP_INSECURE", "false").strip().lower() not in TRUE


def server_ca_file(env: dict[str, str]) -> Path:
    """What the probe verifies the server's certificate with."""
    configured = env.get("EDGELOOP_TLS_CERT_FILE", "").strip()
    if configured:
        return Path(configured)
    return Path(env.get("EDGELOOP_DATA_DIR", SERVER_DATA_DIR_DEFAULT)) / "tls" / "ca.crt"


def probe_url(role: str, env: dict[str, str]) -> str | None:
    """The URL to probe for ``role`` under ``env``; None when the endpoint is switched off."""
    if role not in TARGETS:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(TARGETS)}")
    host_var, host_default, port_var, port_default, path = TARGETS[role]
    host = env.get(host_var, host_default).strip()
    host = WILDCARDS.get(host, host)
    raw_port = env.get(port_var, str(port_default)).strip()
    try:
        port = int(raw_port)
    except ValueError:
        raise ValueError(f"{port_var} must be an integer, got {raw_port!r}") from None
    if port < 0:  # the agent's status endpoint is disabled: nothing to probe
        return None
    if port == 0:
        raise ValueError(f"{port_var}=0 picks a random port, which a health check cannot find")
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if role == "server" and server_tls(env) else "http"
    return f"{scheme}://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} {'|'.join(TARGETS)}\n")
        return 2
    try:
        url = probe_url(argv[1], dict(os.environ))
    except ValueError as exc:
        sys.stderr.write(f"healthcheck: {exc}\n")
        return 2
    if url is None:
        sys.stdout.write("healthcheck: status endpoint disabled; nothing to check\n")
        return 0
    try:
        context = None
        if url.startswith("https:"):  # a missing CA file is unhealthy (OSError), not a crash
            context = ssl.create_default_context(cafile=str(server_ca_file(dict(os.environ))))
            context.check_hostname = False  # the chain is still verified against the CA
        with urllib.request.urlopen(url, timeout=4, context=context) as resp:  # noqa: S310 - fixed URL
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"healthcheck: {url}: {exc}\n")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
