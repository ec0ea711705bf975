"""The content-addressed blob store on a real directory."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from server.store.blobs import BlobNotFoundError, BlobStore


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=[True, False], ids=["fsync", "no-fsync"])
def store(tmp_path, request) -> BlobStore:
    return BlobStore(tmp_path / "blobs", fsync=request.param)


def _leftovers(store: BlobStore) -> list[str]:
    return [p.name for p in store.root.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]


def test_put_get_and_layout(store):
    data = os.urandom(10_000)
    digest = store.put(data)
    assert digest == sha(data)
    assert store.path(digest) == store.root / digest[:2] / digest
    assert store.path(digest).read_bytes() == data
    assert store.get(digest) == data and store.has(digest) and store.size(digest) == len(data)
    assert list(store.iter_hashes()) == [digest]
    assert _leftovers(store) == []


def test_put_is_idempotent(store):
    data = b"same bytes"
    first = store.put(data)
    mtime = store.path(first).stat().st_mtime_ns
    assert store.put(data) == first
    assert store.put(data, expected_sha256=first) == first
    assert store.path(first).stat().st_mtime_ns == mtime  # not rewritten
    assert list(store.iter_hashes()) == [first]


def test_expected_hash_mismatch_stores_nothing(store):
    with pytest.raises(ValueError, match="expected"):
        store.put(b"payload", expected_sha256=sha(b"other payload"))
    assert list(store.iter_hashes()) == [] and _leftovers(store) == []
    assert not store.has(sha(b"payload"))


def test_a_torn_blob_is_replaced_whole(store):
    """A blob of the wrong size (a copy cut short by another tool) is rewritten by the next put."""
    data = os.urandom(4096)
    digest = sha(data)
    path = store.path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:1000])
    assert store.put(data) == digest
    assert store.get(digest) == data and _leftovers(store) == []


def test_empty_blob(store):
    digest = store.put(b"")
    assert digest == sha(b"") and store.get(digest) == b"" and store.size(digest) == 0


@pytest.mark.parametrize("offset, length", [(0, 10), (5, 3), (95, 10), (100, 5), (250, 1), (0, 1000)])
def test_read_range(store, offset, length):
    data = bytes(range(100))
    digest = store.put(data)
    assert store.read_range(digest, offset, length) == data[offset : offset + length]


def test_ranges_reassemble_the_blob(store):
    data = os.urandom(100_003)
    digest = store.put(data)
    parts, pos = [], 0
    while chunk := store.read_range(digest, pos, 4096):
        parts.append(chunk)
        pos += len(chunk)
    assert sha(b"".join(parts)) == digest


def test_missing_blob(store):
    missing = sha(b"never stored")
    assert not store.has(missing)
    for call in (lambda: store.get(missing), lambda: store.read_range(missing, 0, 1), lambda: store.size(missing)):
        with pytest.raises(BlobNotFoundError):
            call()


def test_delete_removes_one_blob_and_says_whether_it_was_there(store):
    keep, gone = store.put(b"keep"), store.put(b"gone")
    assert store.delete(gone) is True and not store.has(gone)
    assert store.delete(gone) is False  # already gone: not an error
    assert store.get(keep) == b"keep" and list(store.iter_hashes()) == [keep]
    with pytest.raises(ValueError, match="SHA-256"):
        store.delete("../" + "a" * 61)
    assert store.put(b"gone") == gone and store.get(gone) == b"gone"  # stored again after a delete


@pytest.mark.parametrize("bad", ["", "abc", "../" + "a" * 61, "A" * 64, "g" * 64, "a" * 63 + "/", "a" * 65, "a" * 64 + "\n"])
def test_names_that_are_not_sha256_are_refused(store, bad):
    with pytest.raises(ValueError, match="SHA-256"):
        store.path(bad)
    with pytest.raises(ValueError):
        store.get(bad)


def test_iter_hashes_skips_foreign_files(store):
    a, b = store.put(b"a"), store.put(b"b")
    (store.root / a[:2] / ".tmp-leftover").write_bytes(b"x")
    (store.root / "README").write_text("not a blob")
    assert sorted(store.iter_hashes()) == sorted([a, b])


def test_a_second_store_on_the_same_root_sees_the_blobs(tmp_path):
    digest = BlobStore(tmp_path / "b").put(b"durable")
    assert BlobStore(tmp_path / "b").get(digest) == b"durable"


def test_readers_never_see_a_partial_blob(tmp_path):
    """Poll the final path while a large blob is written: it is absent or complete, never torn."""
    store = BlobStore(tmp_path / "blobs", fsync=False)
    data = os.urandom(24 << 20)
    path = store.path(sha(data))
    done = threading.Event()
    seen_sizes: set[int] = set()

    def write() -> None:
        store.put(data)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    while not done.is_set():
        try:
            seen_sizes.add(path.stat().st_size)
        except FileNotFoundError:
            seen_sizes.add(-1)
    t.join()
    seen_sizes.add(path.stat().st_size)
    assert seen_sizes <= {-1, len(data)}
    assert _leftovers(store) == []
