"""Compact storage of a multi-bit tensor and its exact byte count (thesis §2.6.5.1: the weights'
storage includes the look-up table of each group's I_g).

:class:`PackedTensor` per tensor:

- ``widths``: I_g per group, one 4-bit nibble each (high nibble first), ⌈G/2⌉ bytes;
- ``alphas``: the Σ_g I_g active coordinates, group by group, in float16 (default) or float32;
- ``bits``: for each group, for each of its I_g bases in order, its n bits (1 = +1, 0 = −1),
  concatenated MSB-first without padding between groups, zero-padded to a whole byte.

``nbytes`` is the sum of the three (shape and grouping are part of the architecture).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.alq.groups import from_groups
from shared.alq.multibit import MultiBit

ALPHA_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}


@dataclass(frozen=True)
class PackedTensor:
    structure: str
    shape: tuple[int, ...]
    group_size: int
    widths: np.ndarray  # (G,) uint8
    alphas: np.ndarray  # (Σ I_g,) float16/float32
    bits: np.ndarray  # packed uint8

    @property
    def nbytes(self) -> int:
        return (len(self.widths) + 1) // 2 + self.alphas.nbytes + self.bits.nbytes

    @property
    def numel(self) -> int:
        return len(self.widths) * self.group_size


def pack(mb: MultiBit, alpha_dtype: str = "fp16") -> PackedTensor:
    """Bit-pack the active bases (compacted: pruned ones cost nothing)."""
    if alpha_dtype not in ALPHA_DTYPES:
        raise ValueError(f"alpha_dtype must be one of {list(ALPHA_DTYPES)}, got {alpha_dtype!r}")
    active = mb.active.numpy()
    widths = active.sum(axis=1).astype(np.uint8)
    alphas = mb.alpha.numpy()[active].astype(ALPHA_DTYPES[alpha_dtype])
    planes = (mb.B.numpy() > 0)[active]  # (Σ I_g, n) in group-major, basis order
    return PackedTensor(mb.structure, mb.shape, mb.group_size, widths, alphas,
                        np.packbits(planes.reshape(-1)))  # fmt: skip


def unpack(pt: PackedTensor) -> MultiBit:
    """Inverse of :func:`pack` (α rounded to the stored dtype)."""
    G, n = len(pt.widths), pt.group_size
    K = max(1, int(pt.widths.max()) if G else 1)
    total = int(pt.widths.sum())
    planes = np.unpackbits(pt.bits, count=total * n).reshape(total, n).astype(np.float32) * 2 - 1
    active = np.arange(K)[None, :] < pt.widths[:, None]
    B = np.ones((G, K, n), dtype=np.float32)
    B[active] = planes
    alpha = np.zeros((G, K), dtype=np.float32)
    alpha[active] = pt.alphas.astype(np.float32)
    return MultiBit(pt.structure, pt.shape, torch.from_numpy(B), torch.from_numpy(alpha),
                    torch.from_numpy(active))  # fmt: skip


def expand(pt: PackedTensor) -> torch.Tensor:
    """The float32 weight tensor ŵ."""
    mb = unpack(pt)
    return from_groups(mb.grouped(), pt.structure, pt.shape)


def model_bytes(packed: dict[str, PackedTensor], state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Storage of a quantised model: packed weights plus every other tensor at its own dtype
    (biases, normalisation layers, BN statistics)."""
    q = sum(p.nbytes for p in packed.values())
    rest = sum(t.numel() * t.element_size() for n, t in state.items() if n not in packed)
    return {"quantised": q, "other": rest, "total": q + rest}
