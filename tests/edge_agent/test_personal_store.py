"""PersonalStore on real files: verified round trip, crash leftovers ignored, corrupt files
deleted (never served), personal models of departed bases collected."""

from __future__ import annotations

import os

import pytest
import torch

from edge_agent.personal_store import PersonalStore, PersonalStoreError
from shared.personal import HeadFinetuneConfig, PersonalDelta, encode_personal

H1, H2 = "11" * 32, "22" * 32


def _artefact(base_hash: str, seed: int = 0) -> tuple[bytes, str]:
    g = torch.Generator().manual_seed(seed)
    delta = PersonalDelta({"net.3.weight": torch.randn(10, 16, generator=g),
                           "net.3.bias": torch.randn(10, generator=g)})
    return encode_personal(base_hash, "head", HeadFinetuneConfig().to_dict(), 50, delta)


def test_put_then_load_verifies(tmp_path):
    store = PersonalStore(tmp_path)
    data, digest = _artefact(H1)
    stored = store.put(data)
    assert stored.personal_hash == digest
    assert store.path(H1, "head") == tmp_path / "models" / "personal" / f"{H1}.head.safetensors"
    assert store.path(H1, "head").read_bytes() == data
    loaded = PersonalStore(tmp_path).load(H1, "head")  # a fresh process sees it too
    assert loaded is not None and loaded.personal_hash == digest
    assert store.load(H2, "head") is None and store.load(H1, "pmeta") is None
    assert store.entries() == [(H1, "head")]


def test_put_refuses_bytes_that_do_not_verify(tmp_path):
    store = PersonalStore(tmp_path)
    data, _ = _artefact(H1)
    with pytest.raises(PersonalStoreError):
        store.put(data[:-1])
    assert store.entries() == []


def test_a_temp_file_from_a_crash_is_ignored_then_collected(tmp_path):
    store = PersonalStore(tmp_path)
    data, digest = _artefact(H1)
    store.put(data)
    # A crash in atomic_write between writing the temp file and the rename leaves this:
    newer, _ = _artefact(H1, seed=1)
    leftover = store.path(H1, "head").with_name(f"{H1}.head.safetensors.tmp-{os.getpid() + 1}")
    leftover.write_bytes(newer[: len(newer) // 2])
    other = store.dir / f"{H2}.head.safetensors.tmp-7"
    other.write_bytes(b"half")
    assert store.entries() == [(H1, "head")]
    assert store.load(H1, "head").personal_hash == digest  # the committed file, not the temp
    assert store.load(H2, "head") is None
    assert store.gc({H1}) == []
    assert not leftover.exists() and not other.exists()
    assert store.load(H1, "head").personal_hash == digest


def test_a_corrupt_file_is_deleted_not_served(tmp_path):
    store = PersonalStore(tmp_path)
    data, _ = _artefact(H1)
    store.put(data)
    path = store.path(H1, "head")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # a bit rotted in the tensor data on the SD card
    path.write_bytes(bytes(raw))
    assert store.load(H1, "head") is None
    assert not path.exists() and store.discarded == 1


def test_a_file_renamed_to_another_base_is_refused(tmp_path):
    store = PersonalStore(tmp_path)
    data, _ = _artefact(H1)
    store.put(data)
    store.path(H1, "head").rename(store.path(H2, "head"))
    assert store.load(H2, "head") is None  # names base H1 inside: refused and deleted
    assert store.entries() == []


def test_gc_removes_personal_models_of_other_bases(tmp_path):
    store = PersonalStore(tmp_path)
    store.put(_artefact(H1)[0])
    store.put(_artefact(H2)[0])
    (store.dir / "README").write_text("not ours")
    assert store.gc({H2}) == [(H1, "head")]
    assert store.entries() == [(H2, "head")]
    assert (store.dir / "README").exists()


def test_keys_cannot_escape_the_directory(tmp_path):
    store = PersonalStore(tmp_path)
    for base, learner in (("../" + "1" * 61, "head"), (H1, "../x"), (H1, "Head"), ("short", "head")):
        with pytest.raises(PersonalStoreError):
            store.path(base, learner)
