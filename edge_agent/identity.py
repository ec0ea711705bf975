"""The device identity: registered once, kept in the data directory (mode 0600)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.download import fsync_dir


@dataclass(frozen=True)
class Identity:
    device_id: str
    credential: str
    server: str


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    # download.atomic_write's steps with a file mode (the credential is 0600 from creation);
    # tests/test_durable_writes.py checks the syscall order, directory fsync included.
    tmp = path.with_name(f".{path.name}.tmp")
    # A temp file left by a crash keeps the mode it was created with: never write into it.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # without it a power cut can forget the rename (a lost identity)


def load_identity(data_dir: Path) -> Identity | None:
    path = data_dir / "identity.json"
    try:
        data = json.loads(path.read_text())
        return Identity(str(data["device_id"]), str(data["credential"]), str(data.get("server", "")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # A torn or edited file: re-registering with the same hardware id recovers the device.
        path.rename(path.with_suffix(".corrupt"))
        return None


def save_identity(data_dir: Path, identity: Identity) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(data_dir / "identity.json", json.dumps(asdict(identity)))


def hardware_id(data_dir: Path, configured: str = "") -> str:
    """The configured id, else one generated once and kept beside the identity."""
    if configured:
        return configured
    path = data_dir / "hardware_id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    value = f"edgeloop-{uuid.uuid4().hex}"
    _atomic_write(path, value, 0o644)
    return value
