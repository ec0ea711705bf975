"""The one private-file writer (server/store/durable.py ``write_private_file``) and its three
users: TLS keys (server/tls.py), the artefact-signing key (server/signing.py) and the bootstrap
operator token (server/domain/operators.py).

The modes are checked on the files; the durability order (temp file created O_EXCL with its
mode, written, fsynced, renamed or linked, directory fsynced) is checked on the system calls
of a child process under ``strace -y`` (skipped where strace cannot trace, failed under CI).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import signing
from server.domain.operators import write_secret_file
from server.store.durable import write_private_file
from server.tls import write_atomic

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_modes_are_exact_under_a_permissive_umask_and_no_temp_file_is_left(tmp_path) -> None:
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "tls" / "server.key", b"k", 0o600)
        write_atomic(tmp_path / "tls" / "server.crt", b"c", 0o644)
        signing.write_key_file(tmp_path / "signing" / "ed25519.key", Ed25519PrivateKey.generate())
        write_secret_file(tmp_path / "operator-token", "elop_x\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "tls" / "server.key") == 0o600
    assert _mode(tmp_path / "tls" / "server.crt") == 0o644
    assert _mode(tmp_path / "signing" / "ed25519.key") == 0o600
    assert _mode(tmp_path / "operator-token") == 0o600
    assert (tmp_path / "operator-token").read_text() == "elop_x\n"
    assert _mode(tmp_path / "tls") == 0o700
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_no_clobber_keeps_the_existing_file_and_replace_overwrites(tmp_path) -> None:
    target = tmp_path / "key"
    write_private_file(target, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_private_file(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    write_private_file(target, b"third")
    assert target.read_bytes() == b"third" and _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


CHILD = r"""
import os, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from server import signing
from server.domain.operators import write_secret_file
from server.tls import write_atomic
root = Path(sys.argv[1])
for d in ("tls", "signing", "token"):
    (root / d).mkdir()
os.write(2, b"@@begin@@\n")
write_atomic(root / "tls" / "ca.key", b"secret-ca-key", 0o600)
signing.write_key_file(root / "signing" / "ed25519.key", Ed25519PrivateKey.generate())
write_secret_file(root / "token" / "operator-token", "elop_secret\n")
os.write(2, b"@@end@@\n")
"""


def _trace(tmp_path: Path) -> list[str]:
    if shutil.which("strace") is None or subprocess.run(["strace", "-o", os.devnull, "true"]).returncode:
        if os.environ.get("CI"):
            pytest.fail("strace cannot trace here")
        pytest.skip("strace unavailable")
    root, log = tmp_path / "root", tmp_path / "trace"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["strace", "-f", "--seccomp-bpf", "-qq", "-y", "-s", "256", "-o", str(log),
                           "-e", "trace=openat,write,fsync,fdatasync,rename,renameat,renameat2,link,linkat",
                           sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [re.sub(r"^\d+\s+", "", line) for line in log.read_text().splitlines()]
    begin = next(i for i, line in enumerate(lines) if "@@begin@@" in line)
    end = next(i for i, line in enumerate(lines) if "@@end@@" in line)
    return [line for line in lines[begin + 1:end] if not re.search(r"= -\d+ ", line)]


def _durable_order(lines: list[str], directory: Path, name: str, *, link: bool) -> None:
    """Create(O_EXCL, mode 0600) -> write -> fsync (the temp file) -> rename/link -> fsync(dir)."""
    d = re.escape(str(directory))
    tmp = rf"{d}/\.{re.escape(name)}\.[0-9a-f]+\.tmp"

    def first(pattern: str, after: int) -> int:
        for i in range(after + 1, len(lines)):
            if re.search(pattern, lines[i]):
                return i
        raise AssertionError(f"{pattern!r} not found after line {after} in:\n" + "\n".join(lines))

    opened = first(rf'openat\(.*"{tmp}", [^)]*O_EXCL[^)]*, 0600\)', -1)
    wrote = first(rf"^write\(\d+<{tmp}>", opened)
    synced = first(rf"^f(data)?sync\(\d+<{tmp}>", wrote)
    moved = first(rf'(link|rename)(at2?)?\(.*"{tmp}".*"{d}/{re.escape(name)}"', synced)
    assert ("link" in lines[moved]) == link, lines[moved]
    first(rf"^fsync\(\d+<{d}>\)", moved)


def test_all_three_writers_are_durable_in_order(tmp_path) -> None:
    lines = _trace(tmp_path)
    root = tmp_path / "root"
    _durable_order(lines, root / "tls", "ca.key", link=False)
    _durable_order(lines, root / "signing", "ed25519.key", link=True)
    _durable_order(lines, root / "token", "operator-token", link=False)
    # The negative control: the checker fails on a trace with the directory fsync removed.
    dropped = [line for line in lines if not re.match(rf"^fsync\(\d+<{re.escape(str(root / 'token'))}>\)", line)]
    with pytest.raises(AssertionError):
        _durable_order(dropped, root / "token", "operator-token", link=False)
