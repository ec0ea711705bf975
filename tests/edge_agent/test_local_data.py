"""The device's local labelled store: bounded, durable across reopen, recovers from a corrupt
file, and never hands out mixed input shapes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.local_data import LocalDataset


def _img(v: int, shape=(1, 8, 8)) -> np.ndarray:
    return np.full(shape, v, dtype=np.uint8)


def test_keeps_the_newest_max_items_in_order(tmp_path) -> None:
    store = LocalDataset(tmp_path / "l.db", max_items=3)
    store.add_many([(_img(i), i) for i in range(4)])
    store.add(_img(4), 4)
    x, y = store.recent()
    assert len(store) == 3 and y.tolist() == [2, 3, 4]
    assert [int(img[0, 0, 0]) for img in x] == [2, 3, 4]
    assert store.recent(2)[1].tolist() == [3, 4]
    assert store.added == 5


def test_survives_reopen(tmp_path) -> None:
    store = LocalDataset(tmp_path / "l.db")
    store.add_many([(_img(7), 1), (_img(9), 2)])
    store.close()
    again = LocalDataset(tmp_path / "l.db")
    x, y = again.recent()
    assert y.tolist() == [1, 2] and x.shape == (2, 1, 8, 8) and int(x[1].max()) == 9
    assert again.added == 0  # counts this process's additions only


def test_corrupt_file_is_moved_aside_and_the_store_starts_empty(tmp_path) -> None:
    path = tmp_path / "l.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    store = LocalDataset(path)
    assert len(store) == 0
    assert list(tmp_path.glob("l.db.corrupt-*"))
    store.add(_img(1), 1)
    assert store.recent()[1].tolist() == [1]


def test_only_the_newest_input_shape_is_returned(tmp_path) -> None:
    store = LocalDataset(tmp_path / "l.db")
    store.add(_img(1, (1, 8, 8)), 1)
    store.add(_img(2, (1, 4, 4)), 2)
    x, y = store.recent()
    assert x.shape == (1, 1, 4, 4) and y.tolist() == [2]


def test_empty_store_and_bad_bound(tmp_path) -> None:
    x, y = LocalDataset(tmp_path / "l.db").recent()
    assert len(x) == 0 and len(y) == 0
    with pytest.raises(ValueError, match="max_items"):
        LocalDataset(tmp_path / "m.db", max_items=0)
