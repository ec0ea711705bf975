"""In-memory diffs: which weights change, to what, and what the agent will end up with.

DPU (thesis Ch. 5, Alg. 5.1) ships only the k*I weights that changed most; the server then
needs to know the exact state every agent will hold afterwards. :func:`make_update` builds
that state by running the same :func:`shared.codec.arith.apply_values` the decoder runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.alq.vector import AlqCode
from shared.alq.vector import decode_values as alq_decode
from shared.alq.vector import encode_values as alq_encode
from shared.codec.arith import ALQ, FP16, INT8, INT8_MAX, RAW, apply_values, to_acc
from shared.codec.dtypes import WireDType, bits_view, from_storage, to_storage, wire_dtype
from shared.models.identity import model_hash
from shared.models.spec import ArchSpec
from shared.tensors import StateDict

VALUE_FORMATS = ("fp32", "fp16", "int8", "alq")
_CODING_OF_FORMAT = {"fp32": RAW, "fp16": FP16, "int8": INT8, "alq": ALQ}


@dataclass(frozen=True)
class AlqParams:
    """The ``alq`` value format's encoder knobs (the decoder needs none of them but the group
    size, which the diff carries): at most ``avg_bits`` encoded bits per value, groups of
    ``group`` consecutive values, at most ``max_bits`` bases per group."""

    avg_bits: float = 2.0
    group: int = 64
    max_bits: int = 6


@dataclass(frozen=True, eq=False)
class TensorDelta:
    """The change to one tensor.

    ``indices`` are sorted flat (row-major) positions, or ``None`` for every position (dense).
    ``values`` are per position: replacement element bits (``coding == "raw"``, storage dtype
    of :mod:`shared.codec.dtypes`), float16 deltas (``"fp16"``) or int8 deltas times ``scale``
    (``"int8"``) or float32 sums of ±α (``"alq"``, whose code is ``alq``); a zero delta
    leaves its weight untouched.
    """

    name: str
    wd: WireDType
    shape: tuple[int, ...]
    coding: str
    indices: np.ndarray | None
    values: np.ndarray
    scale: np.float32 | None = None
    alq: AlqCode | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nnz(self) -> int:
        """Positions the delta carries a value for."""
        return self.numel if self.indices is None else int(self.indices.size)

    def apply_storage(self, base: np.ndarray) -> np.ndarray:
        """New flat storage array; ``base`` (flat storage of the base tensor) is not modified."""
        if self.indices is None:
            return apply_values(base, self.values, self.coding, self.scale, self.wd)
        out = base.copy()
        out[self.indices] = apply_values(
            base[self.indices], self.values, self.coding, self.scale, self.wd
        )
        return out

    def apply_to(self, base: torch.Tensor) -> torch.Tensor:
        return from_storage(self.apply_storage(to_storage(base)), self.wd, self.shape)


@dataclass(eq=False)
class SparseUpdate:
    """A diff between two states with the same names, shapes and dtypes.

    ``target`` is the exact state an agent reconstructs (equal to the requested target for
    ``fp32`` values; the dequantised result for ``fp16``/``int8``). ``residual`` holds, per
    floating tensor, ``requested - target`` in float32 (float64 for float64 tensors), for
    error feedback: add it to the next round's change so no update is lost.
    """

    deltas: dict[str, TensorDelta]  # changed tensors only, sorted by UTF-8 name
    target: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    value_format: str
    base_hash: str
    target_hash: str
    num_weights: int  # elements in the whole state: I of the thesis's accounting
    meta: dict[str, float] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Weights the diff changes (sparse positions plus changed dense-tensor elements)."""
        return sum(d.nnz for d in self.deltas.values())

    @property
    def density(self) -> float:
        """k: the fraction of all weights the diff changes."""
        return self.nnz / self.num_weights if self.num_weights else 0.0

    def apply(self, base: StateDict) -> dict[str, torch.Tensor]:
        """Apply to ``base`` with the decoder's code path (``base`` is not modified)."""
        return apply_deltas(base, self.deltas.values())

    def stats(self) -> dict[str, float]:
        """Counts for logs and metrics: nnz, I, k, residual L1 norm, nnz per changed tensor."""
        per = {f"nnz.{n}": float(d.nnz) for n, d in self.deltas.items()}
        res = sum(float(r.double().abs().sum()) for r in self.residual.values())
        return {
            "nnz": float(self.nnz),
            "num_weights": float(self.num_weights),
            "density": self.density,
            "residual_l1": res,
            **per,
        }


def apply_deltas(base: StateDict, deltas: Iterable[TensorDelta]) -> dict[str, torch.Tensor]:
    """A new state: ``base`` with each delta applied; untouched tensors are copied."""
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in base.items()}
    for d in deltas:
        state[d.name] = d.apply_to(state[d.name])
    return state


def _check_pair(base: StateDict, target: StateDict) -> None:
    if set(base) != set(target):
        missing, extra = sorted(set(base) - set(target)), sorted(set(target) - set(base))
        raise ValueError(
            f"base and target differ in tensor names: only in base {missing}, "
            f"only in target {extra}"
        )
    for name in base:
        b, t = base[name], target[name]
        if b.shape != t.shape or b.dtype != t.dtype:
            raise ValueError(
                f"tensor {name!r}: base is {b.dtype}{tuple(b.shape)}, "
                f"target {t.dtype}{tuple(t.shape)}"
            )
        wire_dtype(b.dtype, name)


def _quantised(
    name: str,
    wd: WireDType,
    shape: tuple[int, ...],
    coding: str,
    idx: np.ndarray,
    base: np.ndarray,
    target: np.ndarray,
    alq: AlqParams = AlqParams(),
) -> TensorDelta | None:
    """fp16/int8/alq delta for the changed positions ``idx``; None when it cannot be quantised."""
    delta = np.subtract(to_acc(target[idx], wd), to_acc(base[idx], wd))
    if not np.isfinite(delta).all():
        return None  # inf/NaN weights are shipped raw
    scale = None
    if coding == ALQ:
        code = alq_encode(delta, alq.group, alq.max_bits, alq.avg_bits)
        if code is None:
            return None  # a coordinate beyond fp16
        d = alq_decode(code)
        if not d.any():  # the budget bought no basis: carry nothing (all stays in the residual)
            return TensorDelta(name, wd, shape, ALQ, idx[:0], d[:0], None, None)
        # Every position stays (the groups are fixed by the value order), even one whose
        # weight the sum leaves unchanged.
        return TensorDelta(name, wd, shape, ALQ, idx, d, None, code)
    if coding == FP16:
        with np.errstate(over="ignore"):
            q = delta.astype(np.float16)
        if not np.isfinite(q).all():
            return None  # |delta| > 65504
    else:
        amax = np.float32(np.abs(delta).max())
        scale = np.float32(amax / np.float32(INT8_MAX))
        if not (np.isfinite(scale) and scale > 0):
            return None
        q = np.clip(np.rint(delta / scale.astype(delta.dtype)), -INT8_MAX, INT8_MAX).astype(np.int8)
    new = apply_values(base[idx], q, coding, scale, wd)
    keep = bits_view(new) != bits_view(base[idx])  # drop deltas that change nothing
    return TensorDelta(name, wd, shape, coding, idx[keep], q[keep], scale)


def make_update(
    base: StateDict,
    target: StateDict,
    value_format: str = "fp32",
    dense_names: set[str] | None = None,
    *,
    arch: ArchSpec,
    alq: AlqParams | None = None,
) -> SparseUpdate:
    """Diff ``target`` against ``base``, two states of the architecture ``arch`` (a diff never
    changes it; both model hashes cover it).

    Entries bitwise equal in both are not shipped. Tensors in ``dense_names`` or with
    ``dim() <= 1`` (biases, norm layers, BatchNorm counters) and all non-float tensors are
    shipped exactly (raw values) whatever ``value_format``; the others carry fp32 replacement
    values (exact), or fp16 / int8-with-scale / alq multi-bit deltas of ``target - base``
    (lossy: see :class:`SparseUpdate`; ``alq`` tunes the last, default :class:`AlqParams`).
    """
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
    dense_names = set(dense_names or ())
    _check_pair(base, target)
    if unknown := sorted(dense_names - set(base)):
        raise ValueError(f"dense_names lists tensors not in the state: {unknown}")
    coding = _CODING_OF_FORMAT[value_format]
    deltas: dict[str, TensorDelta] = {}
    for name in sorted(base, key=lambda n: n.encode("utf-8")):
        b_t, t_t = base[name], target[name]
        wd, shape = wire_dtype(b_t.dtype, name), tuple(b_t.shape)
        b, t = to_storage(b_t), to_storage(t_t)
        idx = np.flatnonzero(bits_view(b) != bits_view(t))
        if idx.size == 0:
            continue
        exact = coding == RAW or not wd.is_float or name in dense_names or b_t.dim() <= 1
        delta = None if exact else _quantised(name, wd, shape, coding, idx, b, t, alq or AlqParams())
        if delta is None:
            delta = TensorDelta(name, wd, shape, RAW, idx, t[idx])
        if delta.nnz:
            deltas[name] = delta
    new_state = apply_deltas(base, deltas.values())
    residual = {
        name: (target[name].detach().cpu().double() - new_state[name].double()).to(
            torch.float64 if new_state[name].dtype == torch.float64 else torch.float32
        )
        for name in new_state
        if new_state[name].is_floating_point()
    }
    return SparseUpdate(
        deltas=deltas,
        target=new_state,
        residual=residual,
        value_format=value_format,
        base_hash=model_hash(arch, base),
        target_hash=model_hash(arch, new_state),
        num_weights=sum(int(v.numel()) for v in base.values()),
    )
