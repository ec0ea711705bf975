"""Tensor helpers both sides agree on: input scaling and the canonical tensor hash."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

StateDict = Mapping[str, torch.Tensor]


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

# Names used in hashes and artefacts; a dtype outside this table is refused.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def to_model_input(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 inputs are scaled to [0, 1] float32; float inputs pass through as float32."""
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU copy of ``t``."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: view the same 2-byte words
        t = t.view(torch.int16)
    arr = t.numpy()
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.byteswap()
    return arr.tobytes()


def update_tensors_hash(h: _Hasher, state: StateDict) -> None:
    """Feed ``state``'s canonical tensor records into ``h``.

    For each tensor in lexicographic (UTF-8 byte) order of its name: u32 name length, name bytes,
    u8 dtype-name length, dtype name (``DTYPE_NAMES``), u32 ndim, u64 per dimension, then the raw
    little-endian element bytes (all integers little-endian).
    """
    for name in sorted(state, key=lambda n: n.encode("utf-8")):
        t = state[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        encoded = name.encode("utf-8")
        dtype = DTYPE_NAMES[t.dtype].encode("ascii")
        h.update(struct.pack("<I", len(encoded)) + encoded)
        h.update(struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack("<I", t.dim()) + struct.pack(f"<{t.dim()}Q", *t.shape))
        h.update(tensor_bytes(t))


def tensors_hash(state: StateDict) -> str:
    """SHA-256 (hex) of a set of tensors alone, independent of file format: the records of
    :func:`update_tensors_hash` and nothing else. Two states hash equal iff they have the same
    names, dtypes, shapes and bits.

    Not a model's identity: that is ``shared.models.model_hash(arch, state)``, which also covers
    the architecture (the v1 model hash was this function; see docs/protocol.md).
    """
    h = hashlib.sha256()
    update_tensors_hash(h, state)
    return h.hexdigest()


def clone_state(state: StateDict) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of a state dict."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
