from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.upload_queue import QueuedSample, UploadQueue
from shared.samples import decode_sample, encode_sample

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def samples(digits) -> list[QueuedSample]:
    """Real encoded digit images, each 6 + 4*3 + 64 = 82 bytes."""
    out = []
    seen = set()
    for i, (x, y) in enumerate(zip(digits.x_train, digits.y_train, strict=True)):
        payload = encode_sample(x)
        if payload in seen:  # identical images would be deduplicated
            continue
        seen.add(payload)
        out.append(
            QueuedSample.from_payload(payload, label=int(y), metadata={"i": str(i)}, captured_at=i)
        )
        if len(out) == 300:
            break
    return out


def test_put_peek_ack_round_trip(tmp_path, samples):
    with UploadQueue(tmp_path / "q.db") as q:
        for s in samples[:5]:
            assert q.put(s)
        assert len(q) == 5 and q.total_bytes == sum(len(s.payload) for s in samples[:5])
        batch = q.peek_batch(3, 1 << 20)
        assert batch == samples[:3]  # oldest first, every field intact
        assert len(q) == 5  # peeking removes nothing
        decoded = decode_sample(batch[0].payload)
        assert decoded.shape == (1, 8, 8)
        assert q.ack([s.sample_id for s in batch] + ["f" * 64]) == 3
        assert q.peek_batch(10, 1 << 20) == samples[3:5]
        assert len(q) == 2


def test_duplicates_are_not_queued_twice(tmp_path, samples):
    with UploadQueue(tmp_path / "q.db") as q:
        assert q.put(samples[0])
        assert not q.put(samples[0])
        assert len(q) == 1 and q.dropped == 0


def test_sample_id_must_be_the_payload_hash(tmp_path, samples):
    bad = QueuedSample("0" * 64, samples[0].payload)
    with UploadQueue(tmp_path / "q.db") as q, pytest.raises(ValueError, match="SHA-256"):
        q.put(bad)


def test_labels_must_be_integers(tmp_path):
    with UploadQueue(tmp_path / "q.db") as q:
        assert q.put(QueuedSample.from_payload(b"a", label=np.int64(4)))
        assert q.peek_batch(1, 100)[0].label == 4
        with pytest.raises(ValueError, match="label"):
            q.put(QueuedSample.from_payload(b"b", label=2.5))


def test_drop_oldest_keeps_the_newest_items(tmp_path, samples):
    with UploadQueue(tmp_path / "q.db", max_items=3) as q:
        assert all(q.put(s) for s in samples[:5])
        assert len(q) == 3 and q.dropped == 2
        assert q.peek_batch(10, 1 << 20) == samples[2:5]


def test_drop_new_keeps_the_oldest_items(tmp_path, samples):
    with UploadQueue(tmp_path / "q.db", max_items=3, on_full="drop_new") as q:
        results = [q.put(s) for s in samples[:5]]
        assert results == [True, True, True, False, False]
        assert q.dropped == 2
        assert q.peek_batch(10, 1 << 20) == samples[:3]


def test_byte_bound(tmp_path, samples):
    size = len(samples[0].payload)
    with UploadQueue(tmp_path / "q.db", max_bytes=4 * size) as q:
        for s in samples[:10]:
            q.put(s)
        assert len(q) == 4 and q.total_bytes <= 4 * size and q.dropped == 6
        huge = QueuedSample.from_payload(b"x" * (5 * size))
        assert not q.put(huge)  # can never fit: dropped, nothing evicted for it
        assert len(q) == 4 and q.dropped == 7


def test_peek_batch_respects_byte_limit_but_never_returns_nothing(tmp_path, samples):
    size = len(samples[0].payload)
    with UploadQueue(tmp_path / "q.db") as q:
        for s in samples[:6]:
            q.put(s)
        assert len(q.peek_batch(100, 2 * size + 1)) == 2
        assert q.peek_batch(100, 1) == samples[:1]  # a head larger than the limit still moves
        with pytest.raises(ValueError):
            q.peek_batch(0, 100)


def test_contents_and_dropped_count_survive_reopen(tmp_path, samples):
    path = tmp_path / "q.db"
    with UploadQueue(path, max_items=4) as q:
        for s in samples[:6]:
            q.put(s)
        q.ack([samples[2].sample_id])
    with UploadQueue(path, max_items=4) as q:
        assert q.peek_batch(10, 1 << 20) == samples[3:6]
        assert q.dropped == 2
        assert q.total_bytes == sum(len(s.payload) for s in samples[3:6])


def test_puts_survive_a_killed_process(tmp_path):
    # The child puts samples and is SIGKILLed without closing: no WAL checkpoint, no
    # cleanup. Every put that returned must be there afterwards.
    path = tmp_path / "q.db"
    child = textwrap.dedent(
        f"""
        import os, signal
        from edge_agent.upload_queue import QueuedSample, UploadQueue
        q = UploadQueue({str(path)!r})
        for i in range(50):
            assert q.put(QueuedSample.from_payload(b"sample-%d" % i, label=i % 10))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    with UploadQueue(path) as q:
        assert len(q) == 50
        batch = q.peek_batch(100, 1 << 20)
        assert [s.payload for s in batch] == [b"sample-%d" % i for i in range(50)]
        assert [s.label for s in batch] == [i % 10 for i in range(50)]


def test_garbage_file_is_moved_aside(tmp_path, samples, caplog):
    path = tmp_path / "q.db"
    path.write_bytes(os.urandom(8192))
    with caplog.at_level(logging.WARNING), UploadQueue(path) as q:
        assert len(q) == 0
        assert q.put(samples[0]) and len(q) == 1
    assert len(list(tmp_path.glob("q.db.corrupt-*"))) == 1
    assert "corrupt" in caplog.text


def test_damaged_pages_are_detected_and_moved_aside(tmp_path, samples):
    path = tmp_path / "q.db"
    with UploadQueue(path) as q:
        for s in samples:
            q.put(s)
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * 4096
    data[2 * 4096 : len(data) - 4096] = os.urandom(len(data) - 3 * 4096)  # keep the header page
    path.write_bytes(bytes(data))
    with UploadQueue(path) as q:
        assert len(q) == 0 and q.put(samples[0])
    assert list(tmp_path.glob("q.db.corrupt-*"))


def test_concurrent_producers_and_consumer(tmp_path):
    q = UploadQueue(tmp_path / "q.db")
    acked: list[str] = []
    done = threading.Event()

    def produce(worker: int) -> None:
        for i in range(40):
            q.put(QueuedSample.from_payload(f"{worker}-{i}".encode()))

    def consume() -> None:
        while not done.is_set() or len(q):
            batch = q.peek_batch(7, 1 << 20)
            q.ack(s.sample_id for s in batch)
            acked.extend(s.sample_id for s in batch)

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    consumer = threading.Thread(target=consume)
    consumer.start()
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    consumer.join(timeout=30)
    assert len(acked) == 160 and len(set(acked)) == 160
    assert len(q) == 0 and q.total_bytes == 0
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.put(QueuedSample.from_payload(b"late"))


@pytest.mark.parametrize("kwargs", [{"max_items": 0}, {"max_bytes": 0}, {"on_full": "block"}])
def test_bad_parameters_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        UploadQueue(tmp_path / "q.db", **kwargs)


def test_corruption_found_while_running_is_recovered(tmp_path, caplog):
    path = tmp_path / "q.db"
    q = UploadQueue(path)
    q._conn.execute("PRAGMA cache_size=1")  # make SQLite re-read pages from the file
    for i in range(300):
        q.put(QueuedSample.from_payload(b"%d" % i + bytes(500)))
    q._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[2 * 4096 : len(data) - 4096] = os.urandom(len(data) - 3 * 4096)
    with open(path, "r+b") as f:  # damaged under the running agent (failing SD card)
        f.write(data)
    with caplog.at_level(logging.WARNING):
        assert q.peek_batch(1000, 1 << 30) == []
    assert "corrupt" in caplog.text and list(tmp_path.glob("q.db.corrupt-*"))
    assert q.put(QueuedSample.from_payload(b"after")) and len(q) == 1
    q.close()
    # a second corruption within the same second keeps both copies
    path.write_bytes(b"garbage" * 1000)
    UploadQueue(path).close()
    moved = [p for p in tmp_path.glob("q.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 2
