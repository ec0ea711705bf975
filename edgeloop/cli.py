"""``edgeloop``: run the server, an agent, or a whole local fleet.

Every option also has an environment variable (``EDGELOOP_*`` for the server,
``EDGELOOP_AGENT_*`` for the agent); a flag given on the command line wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeloop.signing_cli import sign_app, signing_app

app = typer.Typer(help="EdgeLoop: keep edge models accurate, cheap to update and within budget.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
server_app = typer.Typer(help="The server (REST for operators, gRPC for agents).", no_args_is_help=True)
agent_app = typer.Typer(help="The edge agent daemon.", no_args_is_help=True)
fleet_app = typer.Typer(help="A local fleet: one server and N agents as processes on loopback.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(agent_app, name="agent")
app.add_typer(fleet_app, name="fleet")
app.add_typer(data_app, name="data")
server_app.add_typer(signing_app, name="signing")
app.add_typer(sign_app, name="sign")


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _server_settings(**flags: Any):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**_given(**flags))
    except ValidationError as exc:
        _fail(exc)


@server_app.command("run")
def server_run(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    rest_host: Annotated[str | None, typer.Option(help="EDGELOOP_REST_HOST")] = None,
    rest_port: Annotated[int | None, typer.Option(help="EDGELOOP_REST_PORT")] = None,
    grpc_host: Annotated[str | None, typer.Option(help="EDGELOOP_GRPC_HOST")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="EDGELOOP_GRPC_PORT")] = None,
    model_kind: Annotated[str | None, typer.Option(help="EDGELOOP_MODEL_KIND: mlp or cnn")] = None,
    input_shape: Annotated[str | None, typer.Option(help="EDGELOOP_INPUT_SHAPE, e.g. 1,28,28")] = None,
    num_classes: Annotated[int | None, typer.Option(help="EDGELOOP_NUM_CLASSES")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound ports here as JSON once serving.")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_LOG_LEVEL")] = None,
    insecure: Annotated[bool | None, typer.Option("--insecure", help="EDGELOOP_INSECURE: plaintext gRPC and REST, no TLS (warns at every start).", show_default=False)] = None,
    tls_hostnames: Annotated[str | None, typer.Option(help="EDGELOOP_TLS_HOSTNAMES: names/IPs of the generated server certificate, comma separated")] = None,
) -> None:
    """Start the server: migrate the database, then serve REST + gRPC over TLS and run rounds
    (unless EDGELOOP_EMBEDDED_WORKER=false leaves them to `server worker` processes)."""
    from edgeloop.logs import setup_logging

    settings = _server_settings(data_dir=data_dir, database_url=database_url, rest_host=rest_host,
                                rest_port=rest_port, grpc_host=grpc_host, grpc_port=grpc_port,
                                model_kind=model_kind, input_shape=input_shape, num_classes=num_classes,
                                log_level=log_level, insecure=insecure, tls_hostnames=tls_hostnames)
    setup_logging(settings.log_level, "server ")
    from server.app import EdgeLoopServer
    from server.tls import TLSConfigError

    server = EdgeLoopServer(settings)
    try:
        server.start()
    except TLSConfigError as exc:
        server.stop(0)
        _fail(exc)
    if ready_file is not None:
        server.write_ready_file(ready_file)
    server.serve_forever()


@server_app.command("worker")
def server_worker(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR (the server's: blobs are shared)")] = None,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL (the server's)")] = None,
    model_kind: Annotated[str | None, typer.Option(help="EDGELOOP_MODEL_KIND: mlp or cnn")] = None,
    input_shape: Annotated[str | None, typer.Option(help="EDGELOOP_INPUT_SHAPE, e.g. 1,28,28")] = None,
    num_classes: Annotated[int | None, typer.Option(help="EDGELOOP_NUM_CLASSES")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_LOG_LEVEL")] = None,
) -> None:
    """Run update rounds only (no REST, no gRPC) beside `server run`, on its database and data
    directory. Several may run at once: rounds of different cohorts run side by side."""
    from edgeloop.logs import setup_logging

    settings = _server_settings(data_dir=data_dir, database_url=database_url, model_kind=model_kind,
                                input_shape=input_shape, num_classes=num_classes, log_level=log_level)
    setup_logging(settings.log_level, "worker ")
    from server.app import WorkerProcess

    worker = WorkerProcess(settings)
    worker.start()
    worker.serve_forever()


tls_app = typer.Typer(help="TLS of both server ports (docs/security.md#tls-on-both-ports).", no_args_is_help=True)
server_app.add_typer(tls_app, name="tls")


def _print_tls(tls) -> None:
    typer.echo(f"certificate: {tls.cert_file} (valid until {tls.not_after:%Y-%m-%d}, for {', '.join(tls.hostnames)})")
    if tls.ca_file is not None:
        typer.echo(f"CA file: {tls.ca_file}")
    if tls.ca_fingerprint:
        typer.echo(f"CA sha256 fingerprint: {tls.ca_fingerprint}")
        typer.echo(f"agents: EDGELOOP_AGENT_CA_FINGERPRINT={tls.ca_fingerprint}  (or copy the CA file: "
                   "EDGELOOP_AGENT_CA_FILE)")


@tls_app.command("init")
def tls_init(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
    tls_hostnames: Annotated[str | None, typer.Option(help="EDGELOOP_TLS_HOSTNAMES, comma separated")] = None,
) -> None:
    """Create the local CA and the server certificate now (the server does it at first start;
    run this as the server's user), then print what agents pin."""
    from server.tls import TLSConfigError, server_tls

    settings = _server_settings(data_dir=data_dir, tls_hostnames=tls_hostnames)
    try:
        _print_tls(server_tls(settings))
    except TLSConfigError as exc:
        _fail(exc)


@tls_app.command("show")
def tls_show(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Print the CA file and its SHA-256 fingerprint (what agents pin); changes nothing."""
    from cryptography import x509

    from server.tls import ca_paths, fingerprint, tls_dir

    settings = _server_settings(data_dir=data_dir)
    if settings.tls_cert_file is not None:
        certs = x509.load_pem_x509_certificates(settings.tls_cert_file.read_bytes())
        typer.echo(f"certificate: {settings.tls_cert_file} (configured; valid until {certs[0].not_valid_after_utc:%Y-%m-%d})")
        if len(certs) > 1 and certs[-1].issuer == certs[-1].subject:
            typer.echo(f"CA sha256 fingerprint: {fingerprint(certs[-1])}")
        return
    ca_crt, _ = ca_paths(settings.data_dir)
    if not ca_crt.exists():
        _fail(FileNotFoundError(f"no CA in {tls_dir(settings.data_dir)} yet: start the server once or run "
                                "`edgeloop server tls init`"))
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    typer.echo(f"CA file: {ca_crt} (valid until {ca.not_valid_after_utc:%Y-%m-%d})")
    typer.echo(f"CA sha256 fingerprint: {fingerprint(ca)}")
    typer.echo(f"agents: EDGELOOP_AGENT_CA_FINGERPRINT={fingerprint(ca)}  (or copy the CA file: EDGELOOP_AGENT_CA_FILE)")


@server_app.command("migrate")
def server_migrate(
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Apply database migrations (the server also does this at start-up)."""
    from server.db import migrate
    from server.db.engine import make_engine
    from server.store.blobs import BlobStore

    settings = _server_settings(database_url=database_url, data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = BlobStore(settings.data_dir / "blobs", fsync=settings.fsync)
    migrate.upgrade(make_engine(settings.resolved_database_url), blobs=blobs)  # 0003 re-encodes models
    typer.echo(f"database at head: {settings.resolved_database_url.split('@')[-1]}")


enrollment_app = typer.Typer(help="Enrollment tokens agents register with (docs/security.md#device-enrollment). "
                             "Works on the database directly, like `server migrate`.", no_args_is_help=True)
server_app.add_typer(enrollment_app, name="enrollment")


def _enrollment_session(database_url: str | None, data_dir: Path | None):
    from server.db.engine import make_engine, make_session_factory

    settings = _server_settings(database_url=database_url, data_dir=data_dir)
    return make_session_factory(make_engine(settings.resolved_database_url))


def _enrollment_do(factory, action):
    """Run ``action(session)`` in a transaction; a database error (not migrated yet, down)
    is one clear line, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.db.engine import transaction
    from server.domain.errors import DomainError

    try:
        with transaction(factory) as session:
            return action(session)
    except DomainError as exc:
        _fail(exc)
    except SQLAlchemyError as exc:
        _fail(RuntimeError(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]} "
                           "(has `edgeloop server migrate` run?)"))


def _enrollment_row(row) -> dict[str, Any]:
    from server.domain import enrollment as E

    return {"id": row.id, "name": row.name, "status": E.status(row), "uses": row.uses, "max_uses": row.max_uses,
            "tags": list(row.tags or []), "created_at": E.as_utc(row.created_at).isoformat(),
            "expires_at": E.as_utc(row.expires_at).isoformat(),
            "revoked_at": E.as_utc(row.revoked_at).isoformat() if row.revoked_at else None,
            "reenroll": bool(row.reenroll)}


@enrollment_app.command("create")
def enrollment_create(
    name: Annotated[str, typer.Option(help="What the token is for, e.g. 'site-a batch 3'.")],
    tags: Annotated[str, typer.Option(help="Tags granted to every device it enrols, comma separated.")] = "",
    expires_in: Annotated[str, typer.Option(help="Lifetime: 90s, 15m, 12h, 7d, 2w (at most 366 days).")] = "24h",
    max_uses: Annotated[int, typer.Option(help="Devices it may enrol (re-registering one it enrolled uses none).")] = 1,
    reenroll: Annotated[bool, typer.Option("--reenroll", help="May also re-register devices another token "
                                           "enrolled, rotating their credential (e.g. a replaced disk).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the token to this file (mode 0600) instead of printing it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the token's record (and secret) as JSON.")] = False,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Create an enrollment token and print its secret once (agents: EDGELOOP_AGENT_ENROLLMENT_TOKEN)."""
    import json as _json

    from server.domain import enrollment as E
    from server.domain.errors import DomainError
    from server.domain.operators import write_secret_file

    try:
        ttl = E.parse_duration(expires_in)
    except DomainError as exc:
        _fail(exc)
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    issued = _enrollment_do(_enrollment_session(database_url, data_dir), lambda s: E.create_token(
        s, name=name, tags=tag_list, max_uses=max_uses, expires_in=ttl, reenroll=reenroll))
    record = _enrollment_row(issued.token)
    if out is not None:
        write_secret_file(out, issued.secret + "\n")
        typer.echo(f"enrollment token {record['id']} written to {out}", err=True)
    if as_json:
        typer.echo(_json.dumps({**record, **({} if out else {"token": issued.secret})}))
    elif out is None:
        typer.echo(issued.secret)
        typer.echo(f"enrollment token {record['id']} ({record['name']}): {max_uses} use(s), expires "
                   f"{record['expires_at']}; the secret above is not shown again", err=True)


@enrollment_app.command("list")
def enrollment_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Every enrollment token, oldest first (never a secret)."""
    import json as _json

    from server.domain import enrollment as E

    rows = _enrollment_do(_enrollment_session(database_url, data_dir),
                          lambda s: [_enrollment_row(r) for r in E.list_tokens(s)])
    if as_json:
        typer.echo(_json.dumps(rows))
        return
    for r in rows:
        typer.echo(f"{r['id']}  {r['status']:<8} {r['uses']}/{r['max_uses']} uses  expires {r['expires_at']}  "
                   f"tags={','.join(r['tags']) or '-'}{'  reenroll' if r['reenroll'] else ''}  {r['name']}")


@enrollment_app.command("revoke")
def enrollment_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from `enrollment list`).")],
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Revoke a token: Register refuses it from now on (devices it enrolled keep working)."""
    from server.domain import enrollment as E

    row = _enrollment_do(_enrollment_session(database_url, data_dir),
                         lambda s: _enrollment_row(E.revoke_token(s, token_id)))
    typer.echo(f"enrollment token {row['id']} ({row['name']}) revoked")


token_app = typer.Typer(help="Operator API tokens for the REST API (docs/security.md#operator-authentication-api-tokens-and-scopes). "
                        "Works on the database directly, like `server migrate`.", no_args_is_help=True)
server_app.add_typer(token_app, name="token")


def _operator_do(database_url: str | None, data_dir: Path | None, action):
    """Run ``action(session)`` in a transaction on the server's database; a domain or
    database error (not migrated yet, down) is one clear line, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.db.engine import make_engine, make_session_factory, transaction
    from server.domain.errors import DomainError

    settings = _server_settings(database_url=database_url, data_dir=data_dir)
    try:
        engine = make_engine(settings.resolved_database_url)
        try:
            with transaction(make_session_factory(engine)) as session:
                return action(session)
        finally:
            engine.dispose()
    except DomainError as exc:
        _fail(exc)
    except SQLAlchemyError as exc:
        _fail(RuntimeError(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]} "
                           "(has `edgeloop server migrate` run?)"))


def _operator_row(row) -> dict[str, Any]:
    from datetime import timezone

    from server.domain import operators as ops

    def iso(t):  # SQLite returns naive datetimes; all stored values are UTC
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat() if t else None

    return {"id": row.id, "name": row.name, "scope": row.scope, "active": ops.is_active(row),
            "created_by": row.created_by, "created_at": iso(row.created_at), "expires_at": iso(row.expires_at),
            "revoked_at": iso(row.revoked_at), "last_used_at": iso(row.last_used_at)}


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses it (shown in lists and the audit log).")],
    scope: Annotated[str, typer.Option(help="read (GET routes), operate (also rounds, labels) or admin (everything).")],
    expires_in: Annotated[str | None, typer.Option(help="Lifetime: 90s, 15m, 12h, 30d, 2w (at most 3650 days). Default: never expires.")] = None,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Create an operator token; print it once, alone on stdout (details go to stderr)."""
    from server.domain import operators as ops
    from server.domain.errors import DomainError

    try:
        ttl = ops.parse_duration(expires_in) if expires_in is not None else None
    except DomainError as exc:
        _fail(exc)

    def create(session):
        token, secret = ops.create_token(session, name=name, scope=scope, expires_in=ttl, created_by="cli")
        return _operator_row(token), secret

    row, plaintext = _operator_do(database_url, data_dir, create)
    typer.echo(plaintext)
    typer.echo(f"operator token {row['id']} ({row['name']}, scope {row['scope']}, expires "
               f"{row['expires_at'] or 'never'}); the token above is not shown again", err=True)


@token_app.command("list")
def token_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Every operator token, oldest first (never a secret)."""
    import json as _json

    from server.domain import operators as ops

    rows = _operator_do(database_url, data_dir, lambda s: [_operator_row(r) for r in ops.list_tokens(s, limit=10**6)[0]])
    if as_json:
        typer.echo(_json.dumps(rows))
        return
    for r in rows:
        state = "active" if r["active"] else ("revoked" if r["revoked_at"] else "expired")
        typer.echo(f"{r['id']:<12}  {r['scope']:<7}  {state:<7}  expires {r['expires_at'] or 'never':<32}  "
                   f"last used {r['last_used_at'] or 'never':<32}  {r['name']}")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from `token list`; the part after elop_).")],
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Revoke a token: the REST API refuses it from the next call on (idempotent)."""
    from server.domain import operators as ops

    row = _operator_do(database_url, data_dir, lambda s: _operator_row(ops.revoke_token(s, token_id)))
    typer.echo(f"operator token {row['id']} ({row['name']}) revoked at {row['revoked_at']}")


@server_app.command("audit")
def server_audit(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest events to show.")] = 50,
    token: Annotated[str | None, typer.Option(help="Only calls with this token (id or name, or 'anonymous').")] = None,
    action: Annotated[str | None, typer.Option(help="Only this operation id, e.g. rounds-create_round.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """The audit log of mutating operator REST calls, newest first (GET /api/v1/audit reads the same)."""
    import json as _json

    from server.api.schemas import AuditEventPublic
    from server.domain import audit

    rows = _operator_do(database_url, data_dir, lambda s: [
        AuditEventPublic.model_validate(e).model_dump(mode="json")
        for e in audit.list_events(s, token=token, action=action, limit=limit)[0]])
    if as_json:
        typer.echo(_json.dumps(rows))
        return
    for e in rows:
        status = e["status"] if e["status"] is not None else "?"
        typer.echo(f"{e['at']}  {status!s:>3}  {e['token_name']:<20}  {e['action'] or '-':<28}  {e['target'] or '-'}"
                   + (f"  ({e['detail']})" if e["detail"] else ""))


@agent_app.command("run")
def agent_run(
    server: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_SERVER host:port")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_DATA_DIR")] = None,
    name: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_NAME")] = None,
    tags: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_TAGS, comma separated")] = None,
    source: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_SOURCE: dataset or folder")] = None,
    dataset: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_DATASET: name, .npz or folder")] = None,
    watch_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_WATCH_DIR")] = None,
    shard_index: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_SHARD_INDEX")] = None,
    num_shards: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_NUM_SHARDS")] = None,
    max_samples: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_MAX_SAMPLES")] = None,
    rate_per_s: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_RATE_PER_S")] = None,
    upload_mode: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_UPLOAD_MODE")] = None,
    status_port: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_STATUS_PORT (-1 off)")] = None,
    enrollment_token: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_ENROLLMENT_TOKEN")] = None,
    budget_latency_ms: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_LATENCY_MS")] = None,
    budget_memory_mb: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_MEMORY_MB")] = None,
    budget_energy_mj: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_ENERGY_MJ")] = None,
    budget_file: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_FILE (JSON, watched)")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_LOG_LEVEL")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_CA_FILE: PEM CA of the server to pin")] = None,
    ca_fingerprint: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_CA_FINGERPRINT: SHA-256 of the server CA (`edgeloop server tls show`)")] = None,
    tls_server_name: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_TLS_SERVER_NAME")] = None,
    insecure: Annotated[bool | None, typer.Option("--insecure", help="EDGELOOP_AGENT_INSECURE: plaintext gRPC, no TLS (warns at every start).", show_default=False)] = None,
) -> None:
    """Run the agent daemon until SIGINT/SIGTERM."""
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings
    from edgeloop.logs import setup_logging

    try:
        settings = AgentSettings(**_given(
            server=server, data_dir=data_dir, name=name, tags=tags, source=source, dataset=dataset,
            watch_dir=watch_dir, shard_index=shard_index, num_shards=num_shards, max_samples=max_samples,
            rate_per_s=rate_per_s, upload_mode=upload_mode, status_port=status_port,
            enrollment_token=enrollment_token, log_level=log_level, budget_latency_ms=budget_latency_ms,
            budget_memory_mb=budget_memory_mb, budget_energy_mj=budget_energy_mj, budget_file=budget_file,
            ca_file=ca_file, ca_fingerprint=ca_fingerprint, tls_server_name=tls_server_name, insecure=insecure))
    except ValidationError as exc:
        _fail(exc)
    setup_logging(settings.log_level, f"agent[{settings.name or settings.shard_index}] ")
    from edge_agent.daemon import run_agent
    from edge_agent.tls import TLSSetupError

    try:
        run_agent(settings)
    except TLSSetupError as exc:
        _fail(exc)


@fleet_app.command("run")
def fleet_run(
    agents: Annotated[int, typer.Option(min=1, max=64, help="Number of agent processes.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Update rounds to run.")] = 3,
    dataset: Annotated[str, typer.Option(help="Dataset name, .npz file or class folder.")] = "fashion-mnist",
    samples_per_agent: Annotated[int, typer.Option(min=10, help="Samples each agent streams in total.")] = 1000,
    method: Annotated[str, typer.Option(help="Round method: dpu (sparse diffs) or full.")] = "dpu",
    model_kind: Annotated[str, typer.Option(help="mlp, cnn, or pmeta (a conv4/p-Meta model meta-trained by 'pmeta' rounds).")] = "mlp",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per round (per DPU step).")] = 10,
    params: Annotated[str | None, typer.Option(help="Extra round params as JSON.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Keep server/agent data here (default: a temp dir, removed).")] = None,
    database_url: Annotated[str | None, typer.Option(help="Default: SQLite in the work dir.")] = None,
    rate_per_s: Annotated[float, typer.Option(help="Samples per second per agent.")] = 400.0,
    round_timeout_s: Annotated[float, typer.Option(help="Give up on a round after this long.")] = 900.0,
    json_out: Annotated[Path | None, typer.Option(help="Save the per-round figures here.")] = None,
    dress_sparsities: Annotated[str, typer.Option(help="DRESS subnet sparsities ('' for a plain model).")] = "0.5,0.8,0.9,0.95",
    budgets: Annotated[str | None, typer.Option(help='Per-agent static budgets, a JSON list cycled over the agents, e.g. \'[{}, {"energy_mj": 0.03}]\'.')] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC and REST (default: TLS, the agents pin the server's local CA).")] = False,
    few_shot_classes: Annotated[str, typer.Option(help="With --model-kind pmeta: comma-separated dataset labels kept from every agent's stream and given to agent 0 as a few-shot support set, e.g. 7,8,9.")] = "",
    few_shot_shots: Annotated[int, typer.Option(min=1, max=100, help="Support samples per few-shot class.")] = 5,
    domain_shift: Annotated[bool, typer.Option("--domain-shift", help="A resnet fleet; after the rounds agent 0's images invert and it adapts a DA³ adaptor (learner da3).")] = False,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write the fleet charts (accuracy and cumulative bytes, per-subnet accuracy against latency, time per round) as PNG into this folder; needs matplotlib (the bench extra).")] = None,
) -> None:
    """Start a server and N agents locally, run update rounds through REST, print a table."""
    import json as _json

    from edgeloop.fleet import FleetConfig, run_fleet
    from edgeloop.logs import setup_logging

    setup_logging("INFO", "fleet ")
    try:
        extra = _json.loads(params) if params else {}
        cfg = FleetConfig(agents=agents, rounds=rounds, dataset=dataset, samples_per_agent=samples_per_agent,
                          method=method, model_kind=model_kind, epochs=epochs, extra_params=extra,
                          work_dir=work_dir, database_url=database_url, rate_per_s=rate_per_s,
                          round_timeout_s=round_timeout_s, json_out=json_out, dress_sparsities=dress_sparsities,
                          insecure=insecure, few_shot_shots=few_shot_shots, domain_shift=domain_shift,
                          few_shot_classes=tuple(int(c) for c in few_shot_classes.split(",") if c.strip()),
                          plots_dir=plots, **({"budgets": _json.loads(budgets)} if budgets else {}))
        if plots is not None:
            from edgeloop.plots import require_matplotlib

            require_matplotlib()
    except (ValueError, TypeError, RuntimeError) as exc:
        _fail(exc)
    result = run_fleet(cfg)
    raise typer.Exit(0 if result.ok else 1)


@data_app.command("info")
def data_info(dataset: str) -> None:
    """Load a dataset (name, .npz or folder) and print its shape and class balance."""
    from shared.data import DatasetUnavailableError, label_histogram, load_dataset

    try:
        ds = load_dataset(dataset)
    except (DatasetUnavailableError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"{ds.name}: train {ds.x_train.shape} {ds.x_train.dtype}, test {ds.x_test.shape}, "
               f"{ds.num_classes} classes")
    typer.echo(f"train labels per class: {label_histogram(ds.y_train, ds.num_classes).tolist()}")


@data_app.command("glyphs")
def data_glyphs(
    out: Annotated[Path, typer.Option(help="the .npz to write (a folder: FOLDER/glyphs.npz)")],
    fonts: Annotated[list[Path] | None, typer.Option(help="font folders (default /usr/share/fonts/truetype/dejavu)")] = None,
    samples_per_class: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Render the deterministic many-class glyph dataset (docs/pmeta.md) for few-shot learning."""
    import numpy as np

    from shared.data.glyphs import DEFAULT_FONT_DIRS, GlyphError, build_glyphs, font_files

    target = out if out.suffix == ".npz" else out / "glyphs.npz"
    try:
        x, y, names = build_glyphs(font_files(fonts or DEFAULT_FONT_DIRS), samples_per_class=samples_per_class,
                                   seed=seed)  # fmt: skip
    except GlyphError as exc:
        _fail(exc)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with tmp.open("wb") as fh:
        np.savez_compressed(fh, images=x, labels=y, class_names=np.asarray(names))
    tmp.replace(target)
    typer.echo(f"{target}: {len(names)} classes x {samples_per_class} samples, {x.shape[1]}x{x.shape[2]} uint8")
