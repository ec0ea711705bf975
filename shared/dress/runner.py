"""Sparse CPU inference straight from DRESS-CSR tables (thesis §3.3.4-3.5).

Every row of subnet ``k`` in a layer has the same ``n`` nonzeros, so a layer is an ELLPACK
matrix: ``out[g] = sum_j value[g, j] * x[index[g, j]]`` over the first ``n`` columns of the
tables. The kernels are plain torch ops, chosen by measurement on a 1-thread x86 CPU
(docs/dress.md has the numbers):

* conv: im2col and one ``embedding_bag(mode="sum", per_sample_weights)``, which gathers and
  accumulates the selected im2col rows in a single fused pass. Activations live in zero-bordered
  ``(C, B, H + 2p, W + 2p)`` planes; computing the output on the padded width makes every
  im2col row one contiguous run of a plane (a cheap strided copy) and the k-1 extra output
  columns per row are dropped. ``unfold`` + gather + ``bmm`` was 1.5-4x slower, ``unfold``
  alone costing more than the sparse product at high sparsity.
* fc: at batch 1 ``index_select`` + a row-wise dot; from batch 2 on ``embedding_bag`` over the
  feature-major ``(D, B)`` activations (1-float rows make it slow at batch 1).
* ReLU and the folded norm run in place on contiguous outputs and write straight into the next
  layer's padded plane; 2x2 max-pooling is two ``torch.maximum`` of strided views.

``set_subnet`` only takes views of subnet ``k``'s table columns and norm rows: no weight is
copied; only layers that run the dense masked path (chosen by measurement, see
:mod:`shared.dress.kernels`) hold their masked weight, scattered once per switch. Scratch
(padded planes, one im2col buffer) is allocated per batch size and reused; batches above
``max_batch`` run in chunks so it stays bounded. Not thread-safe: one runner per stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shared.dress.kernels import KernelPlan
from shared.dress.layers import DressError
from shared.dress.plan import Op, compile_plan
from shared.dress.tables import DressTables, subnet_state_dict
from shared.models.zoo import build_model


@dataclass
class _Scratch:
    """Per-batch-size buffers and the views into them that a forward needs (built once)."""

    batch: int
    planes: dict[int, torch.Tensor] = field(default_factory=dict)  # conv op -> padded input
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # conv op -> im2col source
    cols: dict[int, torch.Tensor] = field(default_factory=dict)  # conv op -> (N, B*span) im2col
    dst: dict[int, torch.Tensor] = field(default_factory=dict)  # op -> next conv's plane interior


class DressRunner(nn.Module):
    """Runs subnet ``k`` of a :class:`DressTables` on CPU: ``set_subnet(k)`` then ``forward(x)``.

    ``x`` is a float ``(B, *spec.input_shape)`` tensor; returns ``(B, num_classes)`` logits equal
    to the dense masked model's (``subnet_state_dict(tables, k)``) within float32 rounding.

    Each layer runs either the sparse kernel or a dense masked path: its masked weight,
    scattered from the table into a per-layer buffer when the subnet is selected, multiplied
    with torch's dense conv/matmul. ``kernels`` (a :class:`~shared.dress.kernels.KernelPlan`,
    from :func:`~shared.dress.kernels.choose_kernels` at profile time) picks the path per
    subnet, layer and batch size by measurement; without one, a layer whose active density
    ``n / N`` exceeds ``dense_above[kind]`` runs densely (the sparse kernels do ~5-10x fewer
    multiply-adds per second than the dense ones; the defaults are measured crossovers).
    """

    DENSE_ABOVE = {"conv": 0.5, "fc": 0.6}

    def __init__(
        self,
        tables: DressTables,
        subnet: int = 0,
        *,
        dense_above: dict[str, float] | None = None,
        max_batch: int = 32,
        kernels: KernelPlan | None = None,
    ) -> None:
        super().__init__()
        for t in tables.tensors.values():
            if t.device.type != "cpu":
                raise DressError("DressRunner runs on CPU; load the tables to CPU first")
        self.tables = tables
        self.dense_above = dict(self.DENSE_ABOVE, **(dense_above or {}))
        self._ops = compile_plan(tables)
        self._dtype = tables.value(tables.layers[0].name).dtype
        for op in self._ops:
            if op.kind not in ("conv", "fc"):
                continue
            if op.norm is not None and tables.bias(op.table.name) is not None:
                op.bias_shift = torch.empty(op.table.rows, dtype=self._dtype)
        if max_batch < 1:
            raise DressError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._scratches: dict[int, _Scratch] = {}
        self.kernels: KernelPlan | None = None
        self._module: nn.Module | None = None
        self._module_subnet = -1
        self._buckets: dict[int, int] = {}  # batch size -> plan bucket
        self.subnet = -1
        if kernels is not None:
            self._check_plan(kernels)
            self.kernels = kernels
        self.set_subnet(subnet)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The conv/fc layers in execution order (the order of a :class:`KernelPlan`)."""
        return tuple(op.table.name for op in self._ops if op.kind in ("conv", "fc"))

    def _check_plan(self, plan: KernelPlan) -> None:
        if plan.layers != self.layer_names or plan.num_subnets != self.tables.num_subnets:
            raise DressError(
                f"kernel plan covers {plan.num_subnets} subnets of {list(plan.layers)}, the "
                f"tables have {self.tables.num_subnets} of {list(self.layer_names)}"
            )

    @torch.no_grad()
    def set_kernels(self, plan: KernelPlan | None) -> None:
        """Install a kernel plan (None: the ``dense_above`` thresholds) and re-select the subnet."""
        if plan is not None:
            self._check_plan(plan)
        self.kernels = plan
        self._buckets = {}
        self.set_subnet(self.subnet)

    @property
    def num_subnets(self) -> int:
        return self.tables.num_subnets

    @torch.no_grad()
    def set_subnet(self, k: int) -> None:
        """Select subnet ``k``: views of its table columns and norm rows, and its kernel choice."""
        if not 0 <= k < self.tables.num_subnets:
            raise DressError(f"subnet {k} out of range [0, {self.tables.num_subnets})")
        t = self.tables
        plan = self.kernels
        li = 0
        for op in self._ops:
            if op.kind not in ("conv", "fc"):
                continue
            n, g = op.table.counts[k], op.table.rows
            op.count = n
            if plan is None:
                op.dense_at = (n > self.dense_above[op.kind] * op.table.row_size,)
            else:
                op.dense_at = tuple(per_b[li] for per_b in plan.dense[k])
            li += 1
            op.index = t.index(op.table.name)[:, :n]
            op.value = t.value(op.table.name)[:, :n]
            op.offsets = torch.arange(0, g * n, n, dtype=torch.int32)
            op.weight = None
            if any(op.dense_at):
                self._materialize(op)
            bias = t.bias(op.table.name)
            if op.norm is None:
                op.shift = bias  # a view of the table, or None
                continue
            # Tables store norms folded (scale * z + shift): views of subnet k's rows.
            op.scale = t.norm(op.norm.name, "scale", k)
            if bias is None:
                op.shift = t.norm(op.norm.name, "shift", k)
            else:  # scale * (z + bias) + shift, into a fixed buffer
                op.shift = torch.addcmul(
                    t.norm(op.norm.name, "shift", k), bias, op.scale, out=op.bias_shift
                )
        self.subnet = k
        if plan is not None and any(plan.module[k]):
            self._dense_module()  # masked weights loaded at the switch, not in the forward

    def _scratch_for(self, batch: int) -> _Scratch:
        if batch in self._scratches:
            return self._scratches[batch]
        if len(self._scratches) >= 2:  # a full-chunk size and one remainder size at most
            self._scratches.pop(next(iter(self._scratches)))
        scratch = _Scratch(batch)
        convs = [(i, op) for i, op in enumerate(self._ops) if op.kind == "conv"]
        sizes = [
            op.table.row_size * batch * op.in_shape[1] * (op.in_shape[2] + op.kernel - 1)
            for _, op in convs
        ]
        cols = torch.empty(max(sizes, default=0), dtype=self._dtype)  # im2col, shared by all convs
        for i, op in convs:
            c, h, w = op.in_shape
            k, p = op.kernel, op.padding
            rows_p, width_p = h + k - 1, w + k - 1
            span = h * width_p  # output positions per sample, incl. k-1 junk columns per row
            # Contiguous (C, B, H+2p, W+2p) planes (the layout torch's dense conv wants) plus a
            # tail: the last im2col window runs k-2 elements past the last plane.
            flat = torch.zeros(c * batch * rows_p * width_p + width_p, dtype=self._dtype)
            plane = flat[: c * batch * rows_p * width_p].view(c, batch, rows_p, width_p)
            scratch.planes[i] = plane
            # Every im2col row (c, dy, dx) of sample b is one contiguous run of the flat plane.
            scratch.windows[i] = flat.as_strided(
                (c, k, k, batch, span), (batch * rows_p * width_p, width_p, 1, rows_p * width_p, 1)
            )
            scratch.cols[i] = cols[: c * k * k * batch * span].view(c * k * k, batch * span)
            if i > 0:
                scratch.dst[i - 1] = plane[:, :, p : p + h, p : p + w]
        self._scratches[batch] = scratch
        return scratch

    def _materialize(self, op: Op) -> None:
        """Scatter the active subnet's masked ``(G, N)`` weight into the layer's own buffer
        (at subnet selection, so the dense path costs a forward no more than the dense model)."""
        g, n = op.table.rows, op.table.row_size
        if op.weight_buffer is None:
            with torch.inference_mode(False):  # a normal tensor: later switches write it
                op.weight_buffer = torch.empty(g, n, dtype=self._dtype)
        index, value, _ = op.active()
        w = op.weight_buffer
        w.zero_()
        op.weight = w.scatter_(1, index.to(torch.int64), value)

    def _masked_weight(self, op: Op) -> torch.Tensor:
        if op.weight is None:
            self._materialize(op)
        assert op.weight is not None
        return op.weight

    def layer_call(self, k: int, batch: int, layer: int, kernel: str):  # noqa: ANN201
        """A no-argument callable running layer ``layer`` (index into :attr:`layer_names`) of
        subnet ``k`` at ``batch`` with ``kernel`` ("sparse" or "dense") on random input, for
        timing it (:func:`shared.dress.kernels.choose_kernels`)."""
        if kernel not in ("sparse", "dense"):
            raise DressError(f"kernel must be 'sparse' or 'dense', got {kernel!r}")
        dense = kernel == "dense"
        if not 1 <= batch <= self.max_batch:
            raise DressError(f"batch must lie in [1, {self.max_batch}], got {batch}")
        if self.subnet != k:
            self.set_subnet(k)
        if layer == -1:  # the whole subnet: this runner's path, or the dense masked module
            xs = torch.rand(batch, *self.tables.spec.input_shape,
                            generator=torch.Generator().manual_seed(batch))
            if dense:
                module = self._dense_module()
                return lambda: module(xs)
            return lambda: self._run(xs, force_layers=True)
        index = [i for i, op in enumerate(self._ops) if op.kind in ("conv", "fc")][layer]
        op = self._ops[index]
        sc = self._scratch_for(batch)
        gen = torch.Generator().manual_seed(index)
        if dense:
            self._masked_weight(op)
        if op.kind == "conv":
            c, h, w = op.in_shape
            p = op.padding
            plane = sc.planes[index]
            plane[:, :, p : p + h, p : p + w].copy_(torch.rand(c, batch, h, w, generator=gen))
            dst = sc.dst.get(index)

            def run() -> None:
                op.dense = dense
                self._conv(op, plane, sc.windows[index], sc.cols[index], batch, dst)

            return run
        x = torch.rand(op.table.row_size, batch, generator=gen)

        def run_fc() -> None:
            op.dense = dense
            self._fc(op, x, batch)

        return run_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.tables.spec
        if x.dim() != len(spec.input_shape) + 1 or tuple(x.shape[1:]) != spec.input_shape:
            raise DressError(f"input must be (B, *{spec.input_shape}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DressError(f"input must be floating point, got {x.dtype}")
        plan = self.kernels
        if plan is not None and len(x) <= self.max_batch:
            bucket = self._buckets.get(len(x))
            if bucket is None:
                bucket = self._buckets[len(x)] = plan.bucket(len(x))
            module = self._module
            if module is not None and plan.module[self.subnet][bucket]:
                with torch.inference_mode():  # the dense model's own cost, nothing added
                    return module(x.to(self._dtype))
        with torch.inference_mode():
            x = x.to(self._dtype)
            if len(x) <= self.max_batch:
                return self._run(x)
            # Scratch grows with the batch (im2col is N x B*H*W), so big batches run in chunks.
            return torch.cat(
                [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
            )

    def _dense_module(self) -> nn.Module:
        """The active subnet as the dense masked ``nn.Module`` (one module, built once and
        reloaded at each switch to a subnet whose plan uses it)."""
        if self._module is None:
            with torch.inference_mode(False):
                self._module = build_model(self.tables.spec).eval()
            self._module_subnet = -1
        if self._module_subnet != self.subnet:
            with torch.no_grad():
                self._module.load_state_dict(subnet_state_dict(self.tables, self.subnet))
            self._module_subnet = self.subnet
        return self._module

    def _run(self, x: torch.Tensor, force_layers: bool = False) -> torch.Tensor:
        batch = x.shape[0]
        bucket = 0 if self.kernels is None else self.kernels.bucket(batch)
        if not force_layers and self.kernels is not None and self.kernels.module[self.subnet][bucket]:
            return self._dense_module()(x)
        sc = self._scratch_for(batch)
        ops = self._ops
        for op in ops:
            if op.kind in ("conv", "fc"):
                op.dense = op.dense_at[bucket]
        act: torch.Tensor = x
        if ops[0].kind == "conv":
            c, h, w = ops[0].in_shape
            p = ops[0].padding
            sc.planes[0][:, :, p : p + h, p : p + w].copy_(x.transpose(0, 1))
        for i, op in enumerate(ops):
            dst = sc.dst.get(i)
            if op.kind == "conv":
                act = self._conv(op, sc.planes[i], sc.windows[i], sc.cols[i], batch, dst)
            elif op.kind == "pool":
                act = self._pool(op, act, dst)
            elif op.kind == "flatten":
                # Feature-major (D, B) in torch's flatten order (c, h, w).
                if act is x:
                    act = x.reshape(batch, -1).t().contiguous()
                else:  # (C, B, h, w) -> (C, h, w, B)
                    act = act.permute(0, 2, 3, 1).reshape(-1, batch).contiguous()
            else:
                act = self._fc(op, act, batch)
        return act.t().contiguous()

    def _conv(
        self,
        op: Op,
        plane: torch.Tensor,
        windows: torch.Tensor,
        cols: torch.Tensor,
        batch: int,
        dst: torch.Tensor | None,
    ) -> torch.Tensor:
        g = op.table.rows
        c, h, w = op.in_shape
        if op.dense:
            weight = self._masked_weight(op).view(op.table.shape)
            raw = F.conv2d(plane.transpose(0, 1), weight)  # (B, G, H, W)
            self._affine(op, raw, (1, g, 1, 1), scaled=False)
            return self._activate(op, raw, raw.transpose(0, 1), dst)
        cols.view(windows.shape).copy_(windows)
        raw = self._bags(op, cols, fold_scale=True)  # (G, B*span), already scaled
        self._affine(op, raw, (g, 1), scaled=True)
        return self._activate(op, raw, raw.view(g, batch, h, w + op.kernel - 1)[..., :w], dst)

    @staticmethod
    def _bags(op: Op, rows: torch.Tensor, fold_scale: bool) -> torch.Tensor:
        """ELL product ``out[g] = sum_j value[g, j] * rows[index[g, j]]``: one fused
        gather-multiply-accumulate (``embedding_bag``, sum mode, per-sample weights). The
        per-sample weights need a contiguous copy of the value prefix anyway, so the folded
        norm scale is applied in that same pass when ``fold_scale``."""
        index, value, offsets = op.active()
        index = index.to(torch.int32, memory_format=torch.contiguous_format).view(-1)
        if fold_scale and op.scale is not None:
            weights = torch.mul(value, op.scale.view(-1, 1)).view(-1)
        else:
            weights = value.reshape(-1)
        # Positional args: scale_grad_by_freq, mode (0 = sum), sparse, per_sample_weights,
        # include_last_offset, padding_idx (None: no padding row; -1 would mean the last row).
        out, *_ = torch.embedding_bag(
            rows, index, offsets, False, 0, False, weights, False, None
        )
        return out

    @staticmethod
    def _affine(op: Op, raw: torch.Tensor, view: tuple[int, ...], scaled: bool) -> None:
        """``raw = scale * raw + shift`` in place (contiguous, so elementwise ops run fast;
        ``addcmul`` measured 3-4x slower than ``mul_`` + ``add_`` here)."""
        if op.scale is not None and not scaled:
            raw.mul_(op.scale.view(view))
        if op.shift is not None:
            raw.add_(op.shift.view(view))

    @staticmethod
    def _activate(
        op: Op, raw: torch.Tensor, valid: torch.Tensor, dst: torch.Tensor | None
    ) -> torch.Tensor:
        """ReLU, written straight into the next conv's padded plane when there is one."""
        if dst is not None:
            if op.relu:
                torch.clamp_min(valid, 0, out=dst)
            else:
                dst.copy_(valid)
            return dst
        if op.relu:
            raw.relu_()
        return valid

    @staticmethod
    def _pool(op: Op, x: torch.Tensor, dst: torch.Tensor | None) -> torch.Tensor:
        """Max-pooling as elementwise maxima of strided views: ~3x faster at batch 1 than
        ``F.max_pool2d``, which also computes argmax indices on CPU."""
        k, s = op.pool
        h_out, w_out = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
        rows = x[:, :, 0 : s * (h_out - 1) + 1 : s]
        for dy in range(1, k):
            rows = torch.maximum(rows, x[:, :, dy : dy + s * (h_out - 1) + 1 : s])
        out = rows[..., 0 : s * (w_out - 1) + 1 : s]
        for dx in range(1, k):
            last = dst is not None and dx == k - 1
            col = rows[..., dx : dx + s * (w_out - 1) + 1 : s]
            out = torch.maximum(out, col, out=dst) if last else torch.maximum(out, col)
        if dst is not None and k == 1:
            dst.copy_(out)
        return dst if dst is not None else out

    def _fc(self, op: Op, x: torch.Tensor, batch: int) -> torch.Tensor:
        g = op.table.rows
        scaled = False
        if op.dense:
            out = torch.mm(self._masked_weight(op), x)  # (G, B)
        elif batch == 1:  # gather + row-wise dot beats embedding_bag on 1-float rows
            n = op.count
            active_index, value, _ = op.active()
            index = torch.empty(g, n, dtype=torch.int32).copy_(active_index)
            gathered = x.view(-1).index_select(0, index.view(-1)).view(g, n)
            out = torch.mul(gathered, value).sum(1, keepdim=True)  # (G, 1)
        else:
            out = self._bags(op, x, fold_scale=True)  # (G, B)
            scaled = True
        self._affine(op, out, (g, 1), scaled=scaled)
        return self._activate(op, out, out, None)

    def memory_bytes(self, batch: int = 1) -> dict[str, int]:
        """Estimate of resident and peak transient bytes of a forward at ``batch``.

        ``tables``: the table tensors (shared by all subnets); ``folded``: buffers for norms
        that also fold a bias; ``scratch``: padded activation planes, the im2col buffer and the
        masked weights of the active subnet's dense-path layers; ``transient``: the largest per-op temporaries (output and
        the index/value copies of the densest subnet, which bound every sparser one).
        """
        item = torch.empty(0, dtype=self._dtype).element_size()
        tables = sum(t.numel() * t.element_size() for t in self.tables.tensors.values())
        folded = sum(op.table.rows * item for op in self._ops if op.bias_shift is not None)
        planes, cols, transient = 0, 0, 0
        # Dense-path layers of the active subnet hold their masked weight.
        weight = sum(
            op.table.rows * op.table.row_size * item
            for op in self._ops
            if op.kind in ("conv", "fc") and any(op.dense_at)
        )
        for op in self._ops:
            if op.kind == "conv":
                c, h, w = op.in_shape
                k = op.kernel
                planes += (c * batch * (h + k - 1) + 1) * (w + k - 1) * item
                cols = max(cols, c * k * k * batch * h * (w + k - 1) * item)
                out = op.table.rows * batch * h * (w + k - 1) * item
            elif op.kind == "fc":
                out = op.table.rows * batch * item + op.table.row_size * batch * item
            else:
                continue
            copies = op.table.rows * op.table.counts[0] * (4 + item)  # int32 index + values
            transient = max(transient, out + copies)
        scratch = planes + cols + weight
        return {
            "tables": tables,
            "folded": folded,
            "scratch": scratch,
            "transient": transient,
            "peak": tables + folded + scratch + transient,
        }


DressNet = DressRunner
