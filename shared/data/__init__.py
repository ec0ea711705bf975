"""Datasets: built-in offline loaders, generic user formats, non-iid sharding."""

from shared.data.dataset import Dataset, stratified_split
from shared.data.loaders import (
    BUILTIN,
    DatasetUnavailableError,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
)
from shared.data.sharding import label_histogram, shard_non_iid

__all__ = [
    "BUILTIN",
    "Dataset",
    "DatasetUnavailableError",
    "label_histogram",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "shard_non_iid",
    "stratified_split",
]
