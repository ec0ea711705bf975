"""Deterministic non-iid partitioning of a labelled dataset across simulated devices."""

from __future__ import annotations

import numpy as np


def shard_non_iid(
    labels: np.ndarray,
    num_shards: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_per_shard: int = 1,
) -> list[np.ndarray]:
    """Split sample indices into ``num_shards`` label-skewed shards.

    Each class is divided among the shards in proportions drawn from Dirichlet(``alpha``): small
    ``alpha`` gives each device few dominant classes, large ``alpha`` tends to iid. The result
    depends only on (labels, num_shards, alpha, seed): numpy's PCG64 stream is stable across
    platforms and numpy versions. Every index lands in exactly one shard; shards are sorted.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) < num_shards * min_per_shard:
        raise ValueError(f"{len(labels)} samples cannot fill {num_shards} shards of >= {min_per_shard}")
    rng = np.random.Generator(np.random.PCG64(seed))
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for shard, chunk in enumerate(np.split(idx, cuts)):
                parts[shard].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_per_shard:
            return shards
    raise ValueError(f"could not give every shard >= {min_per_shard} samples with alpha={alpha}")


def label_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts per class, for reporting how skewed a shard is."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
