from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.download import (
    DownloadError,
    DownloadIntegrityError,
    PartialDownload,
)
from shared.artefacts import decode_artefact, encode_full_model

REPO = Path(__file__).resolve().parents[2]
MAX = 1 << 24


@pytest.fixture(scope="module")
def artefact(tiny_arch, make_state) -> bytes:
    """A real full-model artefact: what the agent actually downloads."""
    data, _ = encode_full_model(tiny_arch, make_state(1))
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_download_in_chunks_then_finalize(tmp_path, artefact):
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    for c in chunks(artefact, 1000):
        assert not dl.complete
        dl.write(c)
    assert dl.complete and dl.offset == len(artefact)
    path = dl.finalize()
    assert path == tmp_path / f"{sha(artefact)}.artefact"
    assert path.read_bytes() == artefact
    assert not dl.part_path.exists()
    assert decode_artefact(path.read_bytes()).arch is not None


def test_resume_after_restart(tmp_path, artefact):
    half = len(artefact) // 2
    first = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    first.write(artefact[:half])
    first.close()
    second = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    assert second.offset == half
    second.write(artefact[second.offset :])
    assert second.finalize().read_bytes() == artefact


def test_resume_after_the_process_is_killed(tmp_path, artefact):
    # The child writes 3 chunks and is SIGKILLed: whatever write() returned for is on disk.
    (tmp_path / "blob").write_bytes(artefact)
    child = textwrap.dedent(
        f"""
        import os, signal
        from edge_agent.download import PartialDownload
        data = open({str(tmp_path / "blob")!r}, "rb").read()
        dl = PartialDownload({str(tmp_path / "dl")!r}, {sha(artefact)!r}, len(data), {MAX})
        for i in range(3):
            dl.write(data[i * 700 : (i + 1) * 700])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    dl = PartialDownload(tmp_path / "dl", sha(artefact), len(artefact), MAX)
    assert dl.offset == 2100
    dl.write(artefact[2100:])
    assert dl.finalize().read_bytes() == artefact


def test_writing_past_the_expected_size_is_refused(tmp_path, artefact):
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    dl.write(artefact[:-10])
    with pytest.raises(DownloadError, match="pass the expected size"):
        dl.write(artefact[-10:] + b"extra")
    assert dl.offset == len(artefact) - 10
    assert dl.part_path.stat().st_size == len(artefact) - 10
    dl.write(artefact[-10:])
    assert dl.finalize().read_bytes() == artefact


def test_oversized_part_file_is_discarded(tmp_path, artefact):
    (tmp_path / f"{sha(artefact)}.part").write_bytes(artefact + b"junk")
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    assert dl.offset == 0 and not dl.part_path.exists()


def test_corrupted_part_file_fails_verification_and_is_deleted(tmp_path, artefact):
    half = len(artefact) // 2
    damaged = bytearray(artefact[:half])
    damaged[100] ^= 0xFF  # a flipped bit on the SD card between two runs
    (tmp_path / f"{sha(artefact)}.part").write_bytes(bytes(damaged))
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    assert dl.offset == half
    dl.write(artefact[half:])
    with pytest.raises(DownloadIntegrityError, match="expected"):
        dl.finalize()
    assert not dl.part_path.exists() and not dl.final_path.exists()
    retry = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    assert retry.offset == 0


def test_finalize_of_an_incomplete_download_keeps_the_part(tmp_path, artefact):
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    dl.write(artefact[:500])
    with pytest.raises(DownloadError, match="incomplete") as info:
        dl.finalize()
    assert not isinstance(info.value, DownloadIntegrityError)
    assert dl.part_path.stat().st_size == 500


def test_empty_artefact(tmp_path):
    dl = PartialDownload(tmp_path, sha(b""), 0, MAX)
    assert dl.complete
    assert dl.finalize().read_bytes() == b""


def test_discard_starts_over(tmp_path, artefact):
    dl = PartialDownload(tmp_path, sha(artefact), len(artefact), MAX)
    dl.write(artefact[:100])
    dl.discard()
    assert dl.offset == 0 and not dl.part_path.exists()
    dl.write(artefact)
    assert dl.finalize().exists()


@pytest.mark.parametrize(
    "digest, size, max_size, message",
    [
        ("../../etc/passwd", 10, MAX, "64 lowercase hex"),
        ("A" * 64, 10, MAX, "64 lowercase hex"),
        ("a" * 64, MAX + 1, MAX, "outside"),
        ("a" * 64, -1, MAX, "outside"),
    ],
)
def test_bad_parameters_are_refused(tmp_path, digest, size, max_size, message):
    with pytest.raises(DownloadError, match=message):
        PartialDownload(tmp_path, digest, size, max_size)
