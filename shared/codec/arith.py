"""The one place where quantised deltas meet base weights.

With fp16 or int8 values a diff is lossy, so the server's target is *defined* as what this
module computes; :meth:`SparseUpdate.apply` and the decoder both call :func:`apply_values`,
so server and agent agree bit for bit. Every operation is a single IEEE-754 elementwise
op in float32 (float64 for float64 tensors) with round-to-nearest-even: one multiply for int8
dequantisation, one add, one narrowing conversion. No fused multiply-add, no reductions, no
library calls whose rounding could differ between CPUs. (Assumes the FPU's default mode;
a thread with flush-to-zero enabled could differ on subnormals, which the decoder's final
model-hash check would then report rather than install.)
"""

from __future__ import annotations

import numpy as np

from shared.codec.dtypes import WireDType

# Value codings of the in-memory and wire form.
RAW, FP16, INT8, ALQ = "raw", "fp16", "int8", "alq"
INT8_MAX = 127  # symmetric range: q in [-127, 127], so -q is always representable


def acc_dtype(wd: WireDType) -> np.dtype:
    return np.dtype(np.float64) if wd.name == "F64" else np.dtype(np.float32)


def to_acc(storage: np.ndarray, wd: WireDType) -> np.ndarray:
    """Storage values -> accumulator floats (exact: every source format widens losslessly)."""
    if wd.name == "BF16":  # bfloat16 is the top half of a float32
        return (storage.astype(np.uint32) << 16).view(np.float32)
    return storage.astype(acc_dtype(wd))


def from_acc(acc: np.ndarray, wd: WireDType) -> np.ndarray:
    """Accumulator floats -> storage values, rounding to nearest even."""
    if wd.name == "BF16":
        bits = acc.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x0040  # truncation could turn a NaN into inf: force quiet
        return np.where(np.isnan(acc), quiet_nan, rounded).astype(np.uint16)
    return acc.astype(wd.storage)


def dequantise(
    values: np.ndarray, coding: str, scale: np.float32 | None, wd: WireDType
) -> np.ndarray:
    """fp16 deltas widen exactly; int8 deltas become ``float(q) * scale`` (one rounding); alq
    deltas are float32 already."""
    acc = acc_dtype(wd)
    if coding == FP16:
        return values.astype(acc)
    if coding == INT8:
        return np.multiply(values.astype(acc), acc.type(scale))
    if coding == ALQ:  # already float32 sums of ±α (shared.alq.vector.decode_values): exact widening
        return values.astype(np.float32).astype(acc)
    raise ValueError(f"no dequantisation for value coding {coding!r}")


def apply_values(
    base: np.ndarray, values: np.ndarray, coding: str, scale: np.float32 | None, wd: WireDType
) -> np.ndarray:
    """New storage values for positions whose base storage values are ``base``.

    raw: the values replace the base. fp16/int8/alq: ``from_acc(to_acc(base) + dequant(values))``,
    except where the coded delta is zero, which keeps the base bits (so -0.0 and NaN payloads
    of untouched weights survive dense layouts).
    """
    if coding == RAW:
        return values.astype(wd.storage, copy=True)
    # Overflow to inf is IEEE's defined result (a diff whose scale overflows is then refused by
    # its target hash); errstate only silences the warning, which -W error would raise.
    with np.errstate(over="ignore", invalid="ignore"):
        new = from_acc(np.add(to_acc(base, wd), dequantise(values, coding, scale, wd)), wd)
    return np.where(values == 0, base, new)
