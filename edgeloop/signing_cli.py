"""``edgeloop server signing ...`` (the server's key: show, rotate, retire, backfill) and
``edgeloop sign ...`` (an off-server key holder: keygen, sign statements). docs/security.md#signed-artefacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

signing_app = typer.Typer(help="The server's artefact-signing key (docs/security.md#signed-artefacts). "
                          "Works on the database and key file directly, like `server migrate`.", no_args_is_help=True)
sign_app = typer.Typer(help="Sign artefact statements with a key kept off the server (signing_mode=external).",
                       no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")]
DatabaseUrl = Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")]


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _open(database_url: str | None, data_dir: Path | None):
    from pydantic import ValidationError

    from server.db.engine import make_engine, make_session_factory
    from server.settings import ServerSettings
    from server.store.blobs import BlobStore

    try:
        settings = ServerSettings(**{k: v for k, v in {"database_url": database_url, "data_dir": data_dir}.items()
                                     if v is not None})
    except ValidationError as exc:
        _fail(exc)
    engine = make_engine(settings.resolved_database_url)
    return settings, make_session_factory(engine), BlobStore(settings.data_dir / "blobs", fsync=settings.fsync)


def _guard(action):
    from sqlalchemy.exc import SQLAlchemyError

    from server.domain.errors import DomainError
    from server.signing import SigningSetupError
    from shared.signing import SignatureError

    try:
        return action()
    except (DomainError, SigningSetupError, SignatureError, OSError) as exc:
        _fail(exc)
    except SQLAlchemyError as exc:
        _fail(RuntimeError(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]} "
                           "(has `edgeloop server migrate` run?)"))


@signing_app.command("show")
def signing_show(database_url: DatabaseUrl = None, data_dir: DataDir = None) -> None:
    """The signing keys, in the agent's trusted_keys_file format (retired ones commented out)."""
    from sqlalchemy import select

    from server.db.engine import transaction
    from server.db.models import SigningKey

    _, factory, _ = _open(database_url, data_dir)

    def show() -> None:
        with transaction(factory) as s:
            for r in s.scalars(select(SigningKey).order_by(SigningKey.created_at)):
                # The output is a valid trusted_keys_file: retired keys are comments.
                line = f"{bytes(r.public_key).hex()}  # key {r.key_id[:16]}"
                typer.echo(f"# {line} retired" if r.retired_at else line)

    _guard(show)


@signing_app.command("rotate")
def signing_rotate(database_url: DatabaseUrl = None, data_dir: DataDir = None) -> None:
    """New signing key, announced to agents under the current one; existing artefacts are
    countersigned. Running servers pick the new key file up at their next artefact."""
    from server import signing

    settings, factory, blobs = _open(database_url, data_dir)
    rot = _guard(lambda: signing.rotate(settings, factory, blobs))
    typer.echo(json.dumps({"old_key_id": rot.old_key_id, "new_key_id": rot.new_key_id,
                           "countersigned": rot.resigned, "skipped": rot.skipped}, indent=2))
    typer.echo(f"retire the old key once agents have updated: edgeloop server signing retire {rot.old_key_id}",
               err=True)


@signing_app.command("retire")
def signing_retire(key_id: str, database_url: DatabaseUrl = None, data_dir: DataDir = None) -> None:
    """Withdraw trust from an old key (after a rotation)."""
    from server import signing

    settings, factory, _ = _open(database_url, data_dir)
    _guard(lambda: signing.retire(settings, factory, key_id))
    typer.echo(f"retired {key_id[:16]}")


@signing_app.command("backfill")
def signing_backfill(database_url: DatabaseUrl = None, data_dir: DataDir = None) -> None:
    """Sign artefacts published before signing existed (run once after upgrading)."""
    from server import signing

    settings, factory, blobs = _open(database_url, data_dir)
    done, skipped = _guard(lambda: signing.backfill(settings, factory, blobs))
    typer.echo(json.dumps({"signed": done, "skipped": skipped}, indent=2))


# --- the off-server key holder ------------------------------------------------------------------
@sign_app.command("keygen")
def sign_keygen(out: Annotated[Path, typer.Option(help="Where to write the private key (mode 0600).")]) -> None:
    """Create a signing key; prints its public key (the server's signing_public_key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.signing import write_key_file
    from shared.signing import raw_public_key

    key = Ed25519PrivateKey.generate()
    try:
        write_key_file(out, key)
    except FileExistsError:
        _fail(FileExistsError(f"{out} exists; not overwriting a key"))
    typer.echo(raw_public_key(key).hex())


@sign_app.command("statements")
def sign_statements(
    key: Annotated[Path, typer.Option(help="The private key file (`edgeloop sign keygen`).")],
    statements: Annotated[Path, typer.Argument(help="JSON from GET /api/v1/artefacts/unsigned ('-': stdin).")],
) -> None:
    """Sign every statement offline; prints JSON lines {artefact_sha256, key_id, signature}, each
    the body of PUT /api/v1/artefacts/{artefact_sha256}/signature."""
    from server.signing import read_key_file
    from shared import signing as sig

    k = _guard(lambda: read_key_file(key))
    text = sys.stdin.read() if str(statements) == "-" else statements.read_text()
    try:
        doc: Any = json.loads(text)
        items = doc["data"] if isinstance(doc, dict) else doc
        for st in items:
            kid, signature = sig.sign_artefact(
                k, artefact_sha256=st["artefact_sha256"], encoding=st["encoding"], size=st["size"],
                target_model_hash=st["target_model_hash"], base_model_hash=st.get("base_model_hash"))
            typer.echo(json.dumps({"artefact_sha256": st["artefact_sha256"], "key_id": kid,
                                   "signature": signature.hex()}))
    except (ValueError, KeyError, TypeError) as exc:
        _fail(ValueError(f"statements: {exc}"))


@sign_app.command("rotate")
def sign_rotate(
    key: Annotated[Path, typer.Option(help="The current private key file.")],
    out: Annotated[Path, typer.Option(help="Where to write the new private key (mode 0600; never overwritten).")],
) -> None:
    """Rotate the key holder's key offline: writes a new key and prints the key statement (the new
    public key, signed by the current key) as the JSON body of POST /api/v1/signing/statements."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.signing import read_key_file, write_key_file
    from shared import signing as sig

    current = _guard(lambda: read_key_file(key))
    new = Ed25519PrivateKey.generate()
    try:
        write_key_file(out, new)
    except FileExistsError:
        _fail(FileExistsError(f"{out} exists; not overwriting a key"))
    body, signature = sig.sign_key_statement(current, sig.raw_public_key(new))
    typer.echo(json.dumps({"statement": body.decode(), "signature": signature.hex()}))
    typer.echo(f"new key {sig.key_id(sig.raw_public_key(new))}: countersign with GET "
               f"/api/v1/artefacts/unsigned?key_id=<it> and `edgeloop sign statements --key {out}`", err=True)


@sign_app.command("retire")
def sign_retire(
    key: Annotated[Path, typer.Option(help="The current private key file (the new key after a rotation).")],
    key_ids: Annotated[list[str], typer.Argument(help="Ids of the keys to retire (hex SHA-256).")],
) -> None:
    """Prints a key statement, signed by the current key, retiring ``key_ids`` (JSON body of
    POST /api/v1/signing/statements). Retire an old key once every artefact agents may still
    fetch is countersigned by the new one and every agent has seen the new key."""
    from server.signing import read_key_file
    from shared import signing as sig

    current = _guard(lambda: read_key_file(key))
    public = sig.raw_public_key(current)
    try:
        body, signature = sig.sign_key_statement(current, public, retire=key_ids)
    except sig.SignatureError as exc:
        _fail(ValueError(f"retire: {exc}"))
    typer.echo(json.dumps({"statement": body.decode(), "signature": signature.hex()}))
