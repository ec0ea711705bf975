"""The layer sequence the sparse runner executes, derived from an :class:`ArchSpec`.

Walks the spec's modules in order and folds each norm and ReLU into the conv/fc op before it;
refuses anything the kernels in :mod:`shared.dress.runner` do not implement, and propagates
shapes so a mismatch fails when the runner is built rather than mid-inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from shared.dress.layers import DressError
from shared.dress.tables import DressTables, LayerTable, NormTable, template_model


@dataclass
class Op:
    """One step of the forward pass; the runner fills the "active subnet" fields."""

    kind: str  # "conv" | "fc" | "pool" | "flatten"
    layer: LayerTable | None = None
    norm: NormTable | None = None
    relu: bool = False
    kernel: int = 0
    padding: int = 0
    pool: tuple[int, int] = (0, 0)  # (kernel, stride)
    scale: torch.Tensor | None = None  # folded norm of the active subnet (table views)
    shift: torch.Tensor | None = None
    bias_shift: torch.Tensor | None = None  # fixed buffer for shift + bias * scale
    count: int = 0  # n_{k,l} of the active subnet
    dense: bool = False  # run the active subnet's layer with a dense kernel (see DressRunner)
    dense_at: tuple[bool, ...] = (False,)  # that choice per batch bucket of the kernel plan
    weight: torch.Tensor | None = None  # the active subnet's masked dense weight (dense path)
    weight_buffer: torch.Tensor | None = None  # its storage, allocated once per layer
    index: torch.Tensor | None = None  # (G, n) view of the table: the active subnet's columns
    value: torch.Tensor | None = None  # (G, n) view of the table: its weights
    offsets: torch.Tensor | None = None  # int32 bag starts 0, n, 2n, ... for embedding_bag
    in_shape: tuple[int, int, int] = (0, 0, 0)  # (C, H, W) of a conv's input

    @property
    def table(self) -> LayerTable:
        """The layer table of a conv/fc op (pool and flatten ops have none)."""
        if self.layer is None:
            raise DressError(f"a {self.kind} op has no layer table")
        return self.layer

    def active(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, value, offsets) of the active subnet, which DressRunner.set_subnet fills."""
        if self.index is None or self.value is None or self.offsets is None:
            raise DressError(f"the {self.kind} op has no active subnet (call set_subnet)")
        return self.index, self.value, self.offsets


def compile_plan(tables: DressTables) -> list[Op]:
    """Turn the spec's module sequence into ops; refuses layers the kernels do not cover."""
    model = template_model(tables.spec)
    layers = {t.name: t for t in tables.layers}
    norms = {n.name: n for n in tables.norms}
    ops: list[Op] = []
    for name, m in model.named_modules():
        if len(list(m.children())):
            continue
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0]
            if (
                m.kernel_size != (k, k) or k % 2 == 0 or m.stride != (1, 1) or m.dilation != (1, 1)
                or m.groups != 1 or m.padding != ((k - 1) // 2,) * 2 or m.padding_mode != "zeros"
            ):  # fmt: skip
                raise DressError(
                    f"conv {name!r}: only odd square 'same' stride-1 kernels run sparse"
                )
            ops.append(Op("conv", layers[name], kernel=k, padding=(k - 1) // 2))
        elif isinstance(m, nn.Linear):
            ops.append(Op("fc", layers[name]))
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            if not ops or ops[-1].kind not in ("conv", "fc") or ops[-1].norm or ops[-1].relu:
                raise DressError(f"norm {name!r} must directly follow a conv or fc layer")
            ops[-1].norm = norms[name]
        elif isinstance(m, nn.ReLU):
            if not ops or ops[-1].kind not in ("conv", "fc") or ops[-1].relu:
                raise DressError(f"ReLU {name!r} must follow a conv or fc layer (and its norm)")
            ops[-1].relu = True
        elif isinstance(m, nn.MaxPool2d):
            ks, st = m.kernel_size, m.stride
            if (
                not isinstance(ks, int)
                or not isinstance(st, int)
                or m.padding != 0
                or m.dilation != 1
            ):
                raise DressError(f"pool {name!r}: only square unpadded max-pooling is supported")
            ops.append(Op("pool", pool=(ks, st)))
        elif isinstance(m, nn.Flatten):
            ops.append(Op("flatten"))
        else:
            raise DressError(f"module {name!r} ({type(m).__name__}) has no sparse kernel")
    shape = tuple(tables.spec.input_shape)
    for op in ops:  # static shape propagation
        if op.kind == "conv":
            if len(shape) != 3 or shape[0] * op.kernel**2 != op.table.row_size:
                raise DressError(f"conv {op.table.name!r} does not fit input shape {shape}")
            op.in_shape = shape
            shape = (op.table.rows, shape[1], shape[2])
        elif op.kind == "pool":
            k, s = op.pool
            shape = (shape[0], (shape[1] - k) // s + 1, (shape[2] - k) // s + 1)
        elif op.kind == "flatten":
            shape = (math.prod(shape),)
        elif op.kind == "fc":
            if shape != (op.table.row_size,):
                raise DressError(
                    f"fc {op.table.name!r} needs {op.table.row_size} inputs, gets {shape}"
                )
            shape = (op.table.rows,)
    if shape != (tables.spec.num_classes,) or not ops or ops[-1].kind != "fc":
        raise DressError(f"network must end in an fc layer with {tables.spec.num_classes} outputs")
    return ops
