from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import pytest

import edge_agent.sources as sources
from edge_agent.sources import (
    DatasetShardSource,
    FolderWatchSource,
    ImageSupportMissing,
    InputSource,
    load_input_file,
)

PIL = pytest.importorskip("PIL.Image")


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- DatasetShardSource --------------------------------------------------------------------


def indices(obs) -> list[int]:
    return [int(o.metadata["index"]) for o in obs]


def test_shard_source_emits_each_sample_once_in_seeded_order(digits):
    x, y = digits.x_train[:50], digits.y_train[:50]
    a = DatasetShardSource(x, y, rate_per_s=0, seed=3)
    b = DatasetShardSource(x, y, rate_per_s=math.inf, seed=3)
    c = DatasetShardSource(x, y, rate_per_s=0, seed=4)
    got_a = a.poll(20) + a.poll(100)
    assert isinstance(a, InputSource)
    assert a.exhausted and a.poll(5) == []
    assert sorted(indices(got_a)) == list(range(50))
    assert indices(got_a) != list(range(50))  # shuffled
    assert indices(b.poll(50)) == indices(got_a)  # same seed, same order
    assert indices(c.poll(50)) != indices(got_a)
    for o in got_a:
        i = int(o.metadata["index"])
        assert o.label == int(y[i]) and np.array_equal(o.x, x[i]) and o.x.dtype == np.uint8


def test_shard_source_loops_with_a_fresh_permutation(digits):
    x, y = digits.x_train[:20], digits.y_train[:20]
    src = DatasetShardSource(x, y, rate_per_s=0, seed=1, loop=True, send_labels=False)
    first, second = src.poll(20), src.poll(20)
    assert sorted(indices(first)) == sorted(indices(second)) == list(range(20))
    assert indices(first) != indices(second)
    assert {o.metadata["epoch"] for o in second} == {"1"}
    assert not src.exhausted and all(o.label is None for o in first + second)


def test_shard_source_rate_follows_the_clock(digits):
    clock = FakeClock()
    src = DatasetShardSource(digits.x_train, digits.y_train, rate_per_s=10.0, seed=0, clock=clock)
    assert src.poll(100) == []
    clock.t += 1.0
    assert len(src.poll(100)) == 10
    clock.t += 0.25
    assert len(src.poll(100)) == 2  # 2.5 tokens: half a sample carries over
    clock.t += 0.05
    assert len(src.poll(100)) == 1
    clock.t += 1.0
    assert len(src.poll(4)) == 4  # max_items limits; the rest stays available
    assert len(src.poll(100)) == 6
    total = 0
    for _ in range(100):  # average rate over a long run
        clock.t += 0.037
        total += len(src.poll(100))
    assert abs(total - 37) <= 1


def test_shard_source_backlog_is_bounded(digits):
    clock = FakeClock()
    src = DatasetShardSource(
        digits.x_train, digits.y_train, rate_per_s=2.0, seed=0, clock=clock, max_backlog_s=30
    )
    clock.t += 10_000
    assert len(src.poll(10_000)) == 60


def test_shard_source_returns_copies(digits):
    x = digits.x_train[:5].copy()
    src = DatasetShardSource(x, digits.y_train[:5], rate_per_s=0, seed=0)
    before = x.copy()
    for o in src.poll(5):
        o.x[...] = 0
    assert np.array_equal(x, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"rate_per_s": float("nan")}, "rate_per_s"),
        ({"y": np.zeros(3)}, "labels"),
        ({"x": np.zeros((10, 1, 8, 8), dtype=np.int64)}, "uint8 or float32"),
        ({"max_backlog_s": 0.0}, "max_backlog_s"),
    ],
)
def test_shard_source_validates(digits, kwargs, message):
    args = {"x": digits.x_train[:10], "y": digits.y_train[:10], "rate_per_s": 1.0, "seed": 0}
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=message):
        DatasetShardSource(x, y, **args)


# -- FolderWatchSource ---------------------------------------------------------------------

SHAPE = (1, 8, 8)


def age(path, seconds: float = 10.0) -> None:
    """Backdate a file so the source considers it settled."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def drop_npy(folder, name, arr, seconds_old: float = 10.0):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    age(path, seconds_old)
    return path


def test_folder_source_moves_processed_files_and_labels_by_subfolder(tmp_path, digits):
    classes = [str(c) for c in range(10)]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    expected = {}
    for i in range(6):
        img, label = digits.x_train[i], int(digits.y_train[i])
        rel = f"{names[label]}/img{i}.npy"
        drop_npy(tmp_path, rel, img, seconds_old=60 - i)
        expected[rel] = (img, label)
    drop_npy(tmp_path, "loose.npy", digits.x_train[10], seconds_old=1)
    drop_npy(tmp_path, "unknown_class/a.npy", digits.x_train[11], seconds_old=1)
    src = FolderWatchSource(tmp_path, SHAPE, class_names=names)
    got = src.poll(100)
    assert len(got) == 8
    assert [o.metadata["file"] for o in got[:6]] == list(expected)  # oldest first
    for o in got[:6]:
        img, label = expected[o.metadata["file"]]
        assert np.array_equal(o.x, img) and o.label == label
    assert {o.metadata["file"]: o.label for o in got[6:]} == {
        "loose.npy": None,
        "unknown_class/a.npy": None,
    }
    assert (tmp_path / ".processed" / "one" / "img1.npy").exists()
    assert not (tmp_path / "one" / "img1.npy").exists()
    assert src.poll(100) == []
    assert FolderWatchSource(tmp_path, SHAPE, class_names=classes).poll(100) == []  # restart


def test_folder_source_integer_subfolders_give_labels(tmp_path, digits):
    drop_npy(tmp_path, "7/a.npy", digits.x_train[0])
    src = FolderWatchSource(tmp_path, SHAPE)
    assert [o.label for o in src.poll(10)] == [7]
    drop_npy(tmp_path, "3/b.npy", digits.x_train[1])
    assert [
        o.label for o in FolderWatchSource(tmp_path, SHAPE, label_from_subfolder=False).poll(10)
    ] == [None]


def test_folder_source_state_file_mode_leaves_the_folder_alone(tmp_path, digits):
    watch, state = tmp_path / "in", tmp_path / "state.json"
    paths = [drop_npy(watch, f"f{i}.npy", digits.x_train[i], 30 - i) for i in range(5)]
    src = FolderWatchSource(watch, SHAPE, state_file=state)
    assert len(src.poll(3)) == 3 and len(src.poll(3)) == 2
    assert all(p.exists() for p in paths) and not (watch / ".processed").exists()
    restarted = FolderWatchSource(watch, SHAPE, state_file=state)
    assert restarted.poll(10) == []
    # Overwritten with new content: new mtime, so it counts as a new observation.
    drop_npy(watch, "f0.npy", digits.x_train[20], seconds_old=2)
    again = restarted.poll(10)
    assert len(again) == 1 and np.array_equal(again[0].x, digits.x_train[20])
    # Deleted files are forgotten, keeping the state small.
    paths[1].unlink()
    restarted.poll(10)
    assert "f1.npy" not in state.read_text() and "f2.npy" in state.read_text()


def test_folder_source_corrupt_state_file_starts_afresh(tmp_path, digits, caplog):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    drop_npy(tmp_path / "in", "a.npy", digits.x_train[0])
    with caplog.at_level(logging.WARNING):
        src = FolderWatchSource(tmp_path / "in", SHAPE, state_file=state)
    assert len(src.poll(10)) == 1 and "unreadable" in caplog.text


def test_folder_source_waits_for_files_being_written(tmp_path, digits):
    clock = FakeClock(time.time())
    src = FolderWatchSource(tmp_path, SHAPE, wall_clock=clock)
    path = tmp_path / "growing.npy"
    np.save(path, digits.x_train[0])
    os.utime(path, (clock.t, clock.t))
    assert src.poll(10) == []  # modified just now
    with open(path, "ab") as f:  # still growing, though its mtime now looks old
        f.write(b"\0" * 16)
    age(path, 60)
    assert src.poll(10) == []  # size changed since the last poll
    path.write_bytes(b"")  # the writer replaces it with the final content
    np.save(path, digits.x_train[1])
    age(path, 60)
    assert src.poll(10) == []  # size changed again
    got = src.poll(10)  # unchanged since the last poll and settled
    assert len(got) == 1 and np.array_equal(got[0].x, digits.x_train[1])


def test_files_from_the_future_are_taken_once_their_size_is_stable(tmp_path, digits):
    path = drop_npy(tmp_path, "future.npy", digits.x_train[0])
    t = time.time() + 3600
    os.utime(path, (t, t))
    src = FolderWatchSource(tmp_path, SHAPE)
    assert src.poll(10) == []
    assert len(src.poll(10)) == 1


def test_bad_files_are_rejected_without_crashing(tmp_path, digits, caplog):
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "wrong_shape.npy", np.zeros((3, 5), dtype=np.uint8))
    np.save(tmp_path / "too_big.npy", np.full(SHAPE, 300, dtype=np.int16))
    np.save(tmp_path / "nan.npy", np.full(SHAPE, np.nan, dtype=np.float32))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    drop_npy(tmp_path, "good.npy", digits.x_train[0])
    for p in tmp_path.iterdir():
        age(p)
    src = FolderWatchSource(tmp_path, SHAPE)
    with caplog.at_level(logging.WARNING):
        got = src.poll(100)
    assert [o.metadata["file"] for o in got] == ["good.npy"]
    rejected = sorted(p.name for p in (tmp_path / ".rejected").iterdir())
    assert rejected == [
        "broken.png",
        "garbage.npy",
        "nan.npy",
        "pickled.npy",
        "too_big.npy",
        "wrong_shape.npy",
    ]
    assert src.rejected == 6 and "rejected" in caplog.text
    assert src.poll(100) == []


def test_npy_layouts_are_fitted_to_the_input_shape(tmp_path):
    hw = np.arange(64, dtype=np.uint8).reshape(8, 8)
    np.save(tmp_path / "hw.npy", hw)
    assert np.array_equal(load_input_file(tmp_path / "hw.npy", (1, 8, 8)), hw[None])
    hwc = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "hwc.npy", hwc)
    assert np.array_equal(load_input_file(tmp_path / "hwc.npy", (3, 8, 8)), hwc.transpose(2, 0, 1))
    flat = np.linspace(0, 1, 64, dtype=np.float64).reshape(1, 8, 8)
    np.save(tmp_path / "f.npy", flat)
    out = load_input_file(tmp_path / "f.npy", (64,))
    assert out.dtype == np.float32 and out.shape == (64,)


def test_images_are_converted_to_grayscale_or_rgb(tmp_path):
    red = PIL.new("RGB", (40, 30), (255, 0, 0))
    red.save(tmp_path / "red.png")
    gray = load_input_file(tmp_path / "red.png", (1, 28, 28))
    assert gray.shape == (1, 28, 28) and gray.dtype == np.uint8
    assert abs(int(gray[0, 14, 14]) - round(0.299 * 255)) <= 1  # ITU-R 601 luma of red
    rgb = load_input_file(tmp_path / "red.png", (3, 28, 28))
    assert rgb.shape == (3, 28, 28)
    assert (rgb[0] == 255).all() and (rgb[1:] == 0).all()
    gradient = PIL.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)), "L")
    gradient.save(tmp_path / "grad.jpg", quality=95)
    g = load_input_file(tmp_path / "grad.jpg", (16, 16))
    assert g.shape == (16, 16) and g[:, 0].mean() < 40 and g[:, -1].mean() > 200


def test_images_wait_in_place_while_pillow_is_missing(tmp_path, monkeypatch, caplog):
    PIL.new("L", (8, 8), 128).save(tmp_path / "a.png")
    PIL.new("L", (8, 8), 64).save(tmp_path / "b.png")
    for p in tmp_path.iterdir():
        age(p)
    real = sources._import_pil

    def missing():
        raise ImageSupportMissing("image inputs need Pillow")

    monkeypatch.setattr(sources, "_import_pil", missing)
    src = FolderWatchSource(tmp_path, SHAPE)
    with caplog.at_level(logging.ERROR):
        assert src.poll(10) == [] and src.poll(10) == []
    assert caplog.text.count("need Pillow") == 1  # logged once, not per file per poll
    assert (tmp_path / "a.png").exists() and not (tmp_path / ".rejected").exists()
    monkeypatch.setattr(sources, "_import_pil", real)
    got = src.poll(10)
    assert sorted(int(o.x[0, 0, 0]) for o in got) == [64, 128]


def test_folder_source_validates(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        FolderWatchSource(tmp_path, (0, 8))
    with pytest.raises(ValueError, match="distinct"):
        FolderWatchSource(tmp_path, SHAPE, class_names=["a", "a"])
    with pytest.raises(ValueError, match="max_items"):
        FolderWatchSource(tmp_path, SHAPE).poll(-1)
