from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from edge_agent.model_store import ModelStore, ModelStoreError
from shared.models import model_hash


@pytest.fixture
def models(make_state, tiny_arch):
    """Three distinct real model states and their hashes."""
    states = [make_state(seed) for seed in (1, 2, 3)]
    return [(s, model_hash(tiny_arch, s)) for s in states]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_install_and_load(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    assert store.current() is None and store.current_hash() is None
    assert store.install(tiny_arch, s1, expected_hash=h1) == h1
    current = store.current()
    assert current.model_hash == h1 and current.arch == tiny_arch and same_state(current.state, s1)
    assert store.install(tiny_arch, s2, expected_hash=h2) == h2
    pointer = json.loads((tmp_path / "current.json").read_text())
    assert pointer["model_hash"] == h2 and pointer["previous_hash"] == h1
    assert store.has(h1) and store.has(h2) and same_state(store.load(h1).state, s1)
    # A fresh store over the same root (a restart) sees the same thing.
    assert ModelStore(tmp_path).current().model_hash == h2


def test_reinstalling_the_current_model_keeps_the_previous(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    store.install(tiny_arch, s2, expected_hash=h2)
    store.install(tiny_arch, s2, expected_hash=h2)
    assert store.previous_hash() == h1


def test_install_refuses_a_state_with_the_wrong_hash(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    with pytest.raises(ModelStoreError, match="expected"):
        store.install(tiny_arch, s2, expected_hash=h1)
    with pytest.raises(ModelStoreError, match="64 lowercase hex"):
        store.install(tiny_arch, s2, expected_hash="../evil")
    assert store.current_hash() == h1 and store.installed() == [h1]


def test_install_refuses_a_state_that_does_not_fit_the_architecture(tmp_path, tiny_arch, models):
    (s1, h1), _, _ = models
    store = ModelStore(tmp_path)
    wrong_shape = dict(s1)
    wrong_shape["net.1.weight"] = torch.zeros(16, 63)
    extra = {**s1, "extra.weight": torch.zeros(2)}
    for state, message in ((wrong_shape, "architecture needs"), (extra, "unexpected")):
        with pytest.raises(ModelStoreError, match=message):
            store.install(tiny_arch, state, expected_hash=model_hash(tiny_arch, state))
    assert store.current() is None and store.installed() == []


def test_rollback(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    with pytest.raises(ModelStoreError, match="nothing to roll back"):
        store.rollback()
    store.install(tiny_arch, s2, expected_hash=h2)
    assert store.rollback() == h1
    assert store.current().model_hash == h1
    with pytest.raises(ModelStoreError):  # the rejected model is not rolled back to
        store.rollback()


def test_rollback_refuses_a_corrupt_previous_model(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    store.install(tiny_arch, s2, expected_hash=h2)
    store.model_path(h1).write_bytes(b"\0" * 100)
    with pytest.raises(ModelStoreError, match="corrupt"):
        store.rollback()
    assert store.current_hash() == h2


def test_gc_keeps_current_previous_and_newest(tmp_path, tiny_arch, models, make_state):
    store = ModelStore(tmp_path)
    hashes = []
    for seed in range(10, 15):
        state = make_state(seed)
        hashes.append(store.install(tiny_arch, state, expected_hash=model_hash(tiny_arch, state)))
        t = 1_000_000 + seed
        os.utime(store.model_path(hashes[-1]), (t, t))  # distinct mtimes, oldest first
    (store.models_dir / f"{hashes[0]}.safetensors.tmp-999").write_bytes(b"partial")
    assert sorted(store.gc(keep=3)) == sorted(hashes[:2])
    assert store.installed() == sorted(hashes[2:])
    assert not list(store.models_dir.glob("*.tmp-*"))
    assert sorted(store.gc(keep=2)) == [hashes[2]]
    assert sorted(store.gc(keep=1)) == [hashes[3]]
    assert store.installed() == [hashes[4]] and store.current().model_hash == hashes[4]
    with pytest.raises(ValueError, match="keep"):
        store.gc(keep=0)


def test_gc_drops_rolled_back_models_first(tmp_path, tiny_arch, make_state):
    """After a rollback the rejected model is the newest file; it must not keep its place
    over the older model worth keeping, nor pile up over repeated rollbacks."""
    store = ModelStore(tmp_path)
    hashes = []
    for seed in range(20, 24):
        state = make_state(seed)
        hashes.append(store.install(tiny_arch, state, expected_hash=model_hash(tiny_arch, state)))
        t = 1_000_000 + seed
        os.utime(store.model_path(hashes[-1]), (t, t))
    store.activate(hashes[2])  # hashes[3] rolled back: pointer (hashes[2], none)
    assert store.gc(keep=2, discard=[hashes[3], hashes[2]]) == [hashes[3], hashes[0]]
    assert store.installed() == sorted(hashes[1:3])  # the pointer's model is never discarded


# -- crashes and corruption ----------------------------------------------------------------


def test_leftover_temp_file_from_an_interrupted_write(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    (store.models_dir / f"{h2}.safetensors.tmp-4242").write_bytes(b"half a model")
    (tmp_path / "current.json.tmp-4242").write_text('{"model_hash": "')
    assert ModelStore(tmp_path).current().model_hash == h1
    assert ModelStore(tmp_path).install(tiny_arch, s2, expected_hash=h2) == h2


def test_model_written_but_pointer_not_switched(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    pointer = (tmp_path / "current.json").read_bytes()
    store.install(tiny_arch, s2, expected_hash=h2)
    (tmp_path / "current.json").write_bytes(pointer)  # as if power died before the switch
    assert ModelStore(tmp_path).current().model_hash == h1


def test_truncated_active_model_falls_back_to_previous(tmp_path, tiny_arch, models, caplog):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    store.install(tiny_arch, s2, expected_hash=h2)
    path = store.model_path(h2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        current = ModelStore(tmp_path).current()
    assert current.model_hash == h1 and same_state(current.state, s1)
    assert "falling back" in caplog.text
    assert store.current_hash() == h1  # the pointer was repaired


def test_bit_flip_in_active_model_is_caught_by_the_hash(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    store.install(tiny_arch, s2, expected_hash=h2)
    data = bytearray(store.model_path(h2).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes: still parses, hash differs
    store.model_path(h2).write_bytes(bytes(data))
    assert store.current().model_hash == h1


def test_corrupt_pointer_recovers_the_newest_valid_model(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), (s3, h3) = models
    store = ModelStore(tmp_path)
    for (s, h), t in zip(models, (100, 200, 300), strict=True):
        store.install(tiny_arch, s, expected_hash=h)
        os.utime(store.model_path(h), (t, t))
    store.model_path(h3).write_bytes(b"garbage")
    (tmp_path / "current.json").write_bytes(b"\x00\x00\x00")
    assert store.current_hash() is None
    assert store.current().model_hash == h2
    assert store.current_hash() == h2


def test_nothing_valid_gives_none(tmp_path, tiny_arch, models):
    (s1, h1), (s2, h2), _ = models
    store = ModelStore(tmp_path)
    store.install(tiny_arch, s1, expected_hash=h1)
    store.install(tiny_arch, s2, expected_hash=h2)
    store.model_path(h1).unlink()
    store.model_path(h2).write_bytes(b"")
    assert store.current() is None
    with pytest.raises(ModelStoreError, match="not installed"):
        store.load(h1)


def test_power_loss_at_every_step_of_an_install(tmp_path, tiny_arch, models, monkeypatch):
    """Snapshot the store's files at every fsync and rename of an install, as if power died
    there (temp files also cut short, as unsynced data would be), and recover each one."""
    (s1, h1), (s2, h2), _ = models
    root = tmp_path / "store"
    store = ModelStore(root)
    store.install(tiny_arch, s1, expected_hash=h1)
    snapshots = []
    real_replace, real_fsync = os.replace, os.fsync

    def snapshot() -> None:
        dest = tmp_path / f"snap{len(snapshots):02d}"
        shutil.copytree(root, dest)
        snapshots.append(dest)

    def replace(src, dst):
        snapshot()
        real_replace(src, dst)
        snapshot()

    def fsync(fd):
        snapshot()
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    store.install(tiny_arch, s2, expected_hash=h2)
    monkeypatch.undo()
    assert len(snapshots) >= 6

    seen = []
    for snap in snapshots:
        for tmp in snap.rglob("*.tmp-*"):
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
        recovered = ModelStore(snap)
        current = recovered.current()
        assert current is not None, snap
        assert current.model_hash in (h1, h2)
        assert same_state(current.state, s1 if current.model_hash == h1 else s2)
        seen.append(current.model_hash)
        recovered.gc()
        assert not list(snap.rglob("*.tmp-*"))
        # and the interrupted install can simply be repeated
        assert recovered.install(tiny_arch, s2, expected_hash=h2) == h2
        assert recovered.current().model_hash == h2 and recovered.previous_hash() == h1
    # the old model until the pointer switch, the new one after it; never back again
    switch = seen.index(h2)
    assert seen == [h1] * switch + [h2] * (len(seen) - switch) and switch > 0


def test_the_parameter_bound_applies_when_a_model_is_reloaded(tmp_path, tiny_arch, models):
    """The agent's max_model_parameters reaches the store too: a stored model over the bound is
    not loaded (and one under a raised bound, installed by the updater, reloads after a restart)."""
    from shared.artefacts import check_arch_bounds

    (s1, h1), _, _ = models
    n = check_arch_bounds(tiny_arch)
    ModelStore(tmp_path).install(tiny_arch, s1, expected_hash=h1)
    assert ModelStore(tmp_path, max_parameters=n).current().model_hash == h1
    with pytest.raises(ModelStoreError, match="exceeds|limit|parameters"):
        ModelStore(tmp_path, max_parameters=n - 1).load(h1)
