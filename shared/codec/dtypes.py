"""The dtypes a diff can carry, their wire codes, and numpy "storage" views of tensors.

A tensor's storage view is a flat numpy array holding its exact little-endian element bits:
the tensor's own dtype where numpy has it, ``uint16`` bit patterns for bfloat16, ``uint8``
(0/1) for bool. Comparing storage views compares bits, so -0.0 != 0.0 and NaN payloads count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class WireDType:
    code: int  # the byte in the tensor table
    name: str  # as in shared.tensors.DTYPE_NAMES
    torch_dtype: torch.dtype
    storage: np.dtype  # little-endian numpy dtype of the element bits
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


WIRE_DTYPES: tuple[WireDType, ...] = (
    WireDType(0, "F32", torch.float32, np.dtype("<f4"), True),
    WireDType(1, "F16", torch.float16, np.dtype("<f2"), True),
    WireDType(2, "BF16", torch.bfloat16, np.dtype("<u2"), True),
    WireDType(3, "F64", torch.float64, np.dtype("<f8"), True),
    WireDType(4, "I64", torch.int64, np.dtype("<i8"), False),
    WireDType(5, "I32", torch.int32, np.dtype("<i4"), False),
    WireDType(6, "I16", torch.int16, np.dtype("<i2"), False),
    WireDType(7, "I8", torch.int8, np.dtype("i1"), False),
    WireDType(8, "U8", torch.uint8, np.dtype("u1"), False),
    WireDType(9, "BOOL", torch.bool, np.dtype("u1"), False),
)
BY_CODE = {d.code: d for d in WIRE_DTYPES}
BY_TORCH = {d.torch_dtype: d for d in WIRE_DTYPES}
_UINT: dict[int, np.dtype] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def wire_dtype(dtype: torch.dtype, name: str = "") -> WireDType:
    if dtype not in BY_TORCH:
        raise ValueError(f"tensor {name!r} has dtype {dtype}, which diffs cannot carry")
    return BY_TORCH[dtype]


def to_storage(t: torch.Tensor) -> np.ndarray:
    """Flat storage view (a fresh array) of a tensor's element bits."""
    wd = wire_dtype(t.dtype)
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy().view(np.uint16)
    elif t.dtype == torch.bool:
        arr = t.numpy().view(np.uint8)
    else:
        arr = t.numpy()
    return arr.astype(wd.storage, copy=True)


def from_storage(arr: np.ndarray, wd: WireDType, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_storage`; returns a new contiguous CPU tensor of ``shape``."""
    native = arr.astype(wd.storage.newbyteorder("="), copy=True)
    if wd.torch_dtype == torch.bfloat16:
        t = torch.from_numpy(native.view(np.int16)).view(torch.bfloat16)
    elif wd.torch_dtype == torch.bool:
        t = torch.from_numpy(native.view(np.bool_))
    else:
        t = torch.from_numpy(native)
    return t.reshape(shape)


def bits_view(arr: np.ndarray) -> np.ndarray:
    """The same storage as unsigned integers, for bitwise equality tests."""
    return arr.view(_UINT[arr.dtype.itemsize])
