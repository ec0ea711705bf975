"""Datasets: IDX reader, built-in loaders, user .npz files and image folders, non-iid shards."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from shared.data import (
    DatasetUnavailableError,
    label_histogram,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    shard_non_iid,
    stratified_split,
)
from shared.data.idx import IdxFormatError, read_idx


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """The IDX encoding of ``arr``: 0, 0, element code, ndim, big-endian u32 dims, big-endian data."""
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dt).tobytes()


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, dtype",
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
def test_idx_round_trip_every_element_type(tmp_path, code, dtype):
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / "a-idx3"
    path.write_bytes(idx_bytes(arr, code))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)  # native byte order, whatever the file's
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


def test_idx_gzip_is_read_transparently(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(idx_bytes(arr, 0x08))
    np.testing.assert_array_equal(read_idx(path), arr)


def test_idx_labels_vector(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels, 0x08))
    np.testing.assert_array_equal(read_idx(path), labels)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "magic"),
        (b"\x00\x00", "magic"),
        (b"\x01\x00\x08\x03" + GOOD[4:], "magic"),
        (b"\x00\x00\x07\x03" + GOOD[4:], "element type"),
        (b"\x00\x00\x08\x00", "truncated"),
        (GOOD[:10], "truncated"),  # 3 dims announced, only 1.5 present
        (GOOD[:-1], "expected 24 data bytes"),
        (GOOD + b"\x00", "expected 24 data bytes"),
        # A header claiming 2**32 * 2**32 elements is refused before anything is allocated.
        (b"\x00\x00\x08\x02" + struct.pack(">2I", 0xFFFFFFFF, 0xFFFFFFFF), "claims"),
    ],
)
def test_idx_malformed_files_are_refused(tmp_path, raw, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(IdxFormatError, match=message):
        read_idx(path)


def test_idx_corrupt_or_truncated_gzip_is_refused_as_format_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(GOOD)[:-12])  # cut inside the deflate stream / trailer
    with pytest.raises(IdxFormatError):
        read_idx(path)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(IdxFormatError):
        read_idx(path)


# --- built-in datasets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, n_total",
    [
        ("fashion-mnist", (1, 28, 28), 70_000),
        ("mnist5k", (1, 28, 28), 5_000),
        ("digits", (1, 8, 8), 1_797),
        ("uci-mfeat", (1, 16, 15), 2_000),
    ],
)
def test_builtin_loaders_are_consistent(name, shape, n_total):
    ds = load_dataset(name)
    assert ds.input_shape == shape
    assert ds.x_train.dtype == ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert len(ds.x_train) + len(ds.x_test) == n_total
    assert ds.num_classes == 10
    # Every class appears in both splits, and the images carry real content.
    assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
    head = ds.x_train[:500]
    assert head.max() > 100 and head.min() == 0
    assert head.std() > 10
    if name == "fashion-mnist":  # the official split is balanced: 6000 and 1000 per class
        assert len(ds.class_names) == 10
        assert (label_histogram(ds.y_train, 10) == 6000).all()
        assert (label_histogram(ds.y_test, 10) == 1000).all()


def test_split_datasets_are_deterministic_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    train_rows = {r.tobytes() for r in a.x_train}
    # Some digits images are exact duplicates of each other; the split itself is by index.
    assert sum(r.tobytes() in train_rows for r in a.x_test) < len(a.x_test) // 10


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset("fashion-mnist")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "EDGELOOP_FASHION_MNIST_DIR" in msg
    assert str(tmp_path) in msg


def test_fashion_mnist_from_a_folder_of_uncompressed_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 7).astype(np.uint8)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", x[:3]), ("t10k-labels-idx1-ubyte", y[:3])):
        (tmp_path / stem).write_bytes(idx_bytes(arr, 0x08))
    monkeypatch.setenv("EDGELOOP_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0], x)
    np.testing.assert_array_equal(ds.y_test, y[:3])


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("no-such-dataset")


# --- .npz -----------------------------------------------------------------------------------


def _images(n: int, seed: int = 0, shape=(12, 10)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % 4


def test_npz_images_labels_without_test_split(tmp_path):
    x, y = _images(40)
    path = tmp_path / "cam.npz"
    np.savez(path, images=x, labels=y)
    ds = load_dataset(path)
    assert ds.name == "cam" and ds.num_classes == 4
    assert ds.input_shape == (1, 12, 10) and ds.x_train.dtype == np.uint8
    assert len(ds.x_train) + len(ds.x_test) == 40
    assert set(np.unique(ds.y_test)) == {0, 1, 2, 3}  # stratified
    # Each input keeps its own label.
    lookup = {x[i].tobytes(): y[i] for i in range(40)}
    for xi, yi in zip(ds.x_train, ds.y_train, strict=True):
        assert lookup[xi[0].tobytes()] == yi


def test_npz_x_y_keys_with_test_arrays_and_class_names(tmp_path):
    x, y = _images(20)
    xt, yt = _images(6, seed=1)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c", "d", "e"]))
    ds = load_npz(path)
    np.testing.assert_array_equal(ds.x_train[:, 0], x)
    np.testing.assert_array_equal(ds.x_test[:, 0], xt)
    assert ds.class_names == ("a", "b", "c", "d", "e")
    assert ds.num_classes == 5  # the class names can name more classes than the labels use


def test_npz_nhwc_is_transposed_to_nchw(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, images=x, labels=np.arange(10) % 2, images_test=x[:4], labels_test=np.arange(4) % 2)
    ds = load_npz(path)
    assert ds.input_shape == (3, 8, 6)
    np.testing.assert_array_equal(ds.x_train, x.transpose(0, 3, 1, 2))


def test_npz_float_features_stay_float32(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5))  # float64 feature vectors
    path = tmp_path / "feat.npz"
    np.savez(path, x=x, y=np.arange(30) % 3)
    ds = load_npz(path)
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (5,)
    assert np.allclose(np.sort(np.concatenate([ds.x_train, ds.x_test]).ravel()),
                       np.sort(x.astype(np.float32).ravel()))


def test_npz_small_int_images_become_uint8(tmp_path):
    x = np.full((8, 4, 4), 200, dtype=np.int64)
    path = tmp_path / "ints.npz"
    np.savez(path, images=x, labels=np.arange(8) % 2)
    assert load_npz(path).x_train.dtype == np.uint8


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"foo": np.zeros(3)}, "expected arrays 'images' and 'labels'"),
        ({"images": np.zeros((4, 3, 3), np.uint8), "labels": np.zeros(5, np.int64)}, "vector of 4"),
        ({"images": np.zeros((4, 3, 3), np.uint8), "labels": np.zeros(4, np.float32)}, "integers"),
        ({"images": np.zeros((4, 3, 3), np.uint8), "labels": -np.ones(4, np.int64)}, "non-negative"),
        ({"images": np.full((4, 3, 3), np.nan), "labels": np.zeros(4, np.int64)}, "NaN"),
        ({"images": np.full((4, 3, 3), 300), "labels": np.zeros(4, np.int64)}, "0..255"),
        ({"images": np.zeros((4, 2, 3, 3, 3), np.uint8), "labels": np.zeros(4, np.int64)}, "inputs must be"),
        ({"images": np.zeros((4, 3), np.complex64), "labels": np.zeros(4, np.int64)}, "unsupported"),
    ],
)
def test_npz_bad_contents_are_refused(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(path)


def test_npz_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "evil.npz"
    objs = np.empty(4, dtype=object)
    objs[:] = [{"a": 1}, None, 3, "x"]
    np.savez(path, images=objs, labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="(?i)pickle"):
        load_npz(path)


def test_npz_file_that_is_not_an_npz_is_refused(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello, I am not numpy")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(text)
    # A plain .npy array saved under an .npz name.
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="npz"):
        load_npz(npy)
    with pytest.raises(ValueError):
        load_npz(tmp_path / "missing.npz")


# --- image folders --------------------------------------------------------------------------


def _write_images(root: Path, per_class: dict[str, int], *, mode: str = "L", size=(9, 7), seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def test_image_folder_grayscale(tmp_path):
    root = tmp_path / "pets"
    _write_images(root, {"cat": 6, "dog": 5, "emu": 4})
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(root)
    assert ds.class_names == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.input_shape == (1, 7, 9) and ds.x_train.dtype == np.uint8
    assert len(ds.x_train) + len(ds.x_test) == 15
    assert sorted(np.concatenate([ds.y_train, ds.y_test]).tolist()) == [0] * 6 + [1] * 5 + [2] * 4


def test_image_folder_colour_and_resizing(tmp_path):
    from PIL import Image

    root = tmp_path / "rgb"
    _write_images(root, {"a": 3, "b": 3}, mode="RGB", size=(6, 5))
    Image.fromarray(np.zeros((20, 30, 3), np.uint8), "RGB").save(root / "b" / "big.png")
    ds = load_image_folder(root)
    assert ds.input_shape == (3, 5, 6)  # every image takes the first image's size
    assert len(ds.x_train) + len(ds.x_test) == 7
    assert load_image_folder(root, grayscale=True).input_shape == (1, 5, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="sub-folder"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path)
    (tmp_path / "empty" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image_folder(tmp_path)


# --- splits and shards ----------------------------------------------------------------------


def test_stratified_split_validates_fraction():
    x, y = np.zeros((10, 2), np.uint8), np.arange(10) % 2
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            stratified_split(x, y, bad, 0)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("digits").y_train


def test_shards_are_deterministic_disjoint_and_cover_everything(labels):
    a = shard_non_iid(labels, 8, alpha=0.3, seed=5)
    b = shard_non_iid(labels, 8, alpha=0.3, seed=5)
    assert len(a) == 8
    for s, t in zip(a, b, strict=True):
        np.testing.assert_array_equal(s, t)
        assert (np.diff(s) > 0).all()  # sorted, no repeats
    allidx = np.concatenate(a)
    assert len(allidx) == len(labels)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))
    c = shard_non_iid(labels, 8, alpha=0.3, seed=6)
    assert any(len(s) != len(t) or (s != t).any() for s, t in zip(a, c, strict=True))


def _skew(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean total-variation distance between each shard's label mix and the global mix."""
    glob = label_histogram(labels, 10) / len(labels)
    tv = [0.5 * np.abs(label_histogram(labels[s], 10) / len(s) - glob).sum() for s in shards]
    return float(np.mean(tv))


def test_label_skew_decreases_with_alpha(labels):
    skews = [np.mean([_skew(labels, shard_non_iid(labels, 10, alpha=a, seed=s)) for s in range(3)])
             for a in (0.05, 0.5, 5.0, 500.0)]
    assert skews == sorted(skews, reverse=True), skews
    assert skews[0] > 0.5 and skews[-1] < 0.1


def test_shard_min_per_shard_and_validation(labels):
    shards = shard_non_iid(labels, 20, alpha=0.1, seed=0, min_per_shard=5)
    assert min(len(s) for s in shards) >= 5
    with pytest.raises(ValueError, match="num_shards"):
        shard_non_iid(labels, 0)
    with pytest.raises(ValueError, match="alpha"):
        shard_non_iid(labels, 4, alpha=0)
    with pytest.raises(ValueError, match="cannot fill"):
        shard_non_iid(labels[:10], 4, min_per_shard=3)
