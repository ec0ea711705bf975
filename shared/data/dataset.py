"""The in-memory dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """Images (or feature vectors) with integer labels, split into train and test.

    ``x`` arrays are ``uint8`` (8-bit images, shape ``(N, C, H, W)``) or ``float32`` (already
    scaled features, shape ``(N, C, H, W)`` or ``(N, D)``). Keeping 8-bit data as ``uint8``
    makes uploads from devices 4x smaller; :func:`shared.tensors.to_model_input` scales it.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise ValueError(f"{self.name}: {split} has {len(x)} inputs but {len(y)} labels")
            if x.dtype not in (np.uint8, np.float32):
                raise ValueError(f"{self.name}: {split} inputs must be uint8 or float32, got {x.dtype}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                    f"got [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train inputs {self.x_train.shape[1:]} and test inputs "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic per-class split for datasets that ship without a test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.Generator(np.random.PCG64(seed))
    test_idx: list[np.ndarray] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.append(idx[: max(1, int(round(len(idx) * test_fraction)))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]
