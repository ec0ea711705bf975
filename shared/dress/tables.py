"""DRESS-CSR: all K nested subnets in the storage of the densest one (thesis §3.3.4, Fig. 3.4).

Per sparse layer (``G`` rows of ``N`` weights) the table holds, for the densest subnet only:

* ``<layer>.index``: the column indices of each row sorted by importance (``|w|`` descending,
  ties by index ascending), in the smallest integer dtype that holds ``N - 1``;
* ``<layer>.value``: the weights in the same order.

Both have shape ``(G, n_1)`` (Fig. 3.4's two tables): row ``g`` lists its weights from most to
least important. Subnet ``k`` is the first ``n_k`` columns of both, ``[:, :n_k]``: a strided
view, so selecting it copies nothing. (A slot-major ``(n_1, G)`` layout, where a subnet is a
contiguous prefix, was measured too: the row-wise gathers of the kernels then need transposed
copies that cost 5-30x more than copying row slices, so rows stay contiguous.)
The per-subnet counts ``n_{k,l}`` live in the JSON metadata, as do the architecture and the
hash of the weights the tables were built from. Biases are dense and shared. Normalisation
layers are stored per subnet (§3.3.5) in the folded form inference uses, ``scale = gamma /
sqrt(var + eps)`` and ``shift = beta - mean * scale`` as ``(K, C)`` tensors (``(1, C)`` when all
subnets share them): half the bytes of the four BN tensors, which keeps the K subnets within
~2-4% of the densest subnet's storage even for narrow networks.

:mod:`shared.dress.serialize` stores the tables as one safetensors file (tensors + this
module's JSON metadata) and counts its bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from shared.dress.costs import layer_costs
from shared.dress.layers import DressError, SparseLayer, as_rows, sparse_layers
from shared.dress.masks import NORM_STATE, norm_layers
from shared.dress.sampling import (
    Allocation,
    allocate_sparsity,
    check_allocation,
    check_sparsities,
    row_order,
)
from shared.models.identity import model_hash
from shared.models.spec import ArchSpec
from shared.models.zoo import build_model
from shared.tensors import StateDict

FORMAT = "dress-csr/v1"
NORM_KEYS = ("scale", "shift")  # per-norm-layer tensors in the tables


def index_dtype(row_size: int) -> torch.dtype:
    """Smallest integer dtype holding column indices ``0 .. row_size - 1``."""
    if row_size <= 1 << 8:
        return torch.uint8
    if row_size <= 1 << 15:
        return torch.int16
    if row_size <= 1 << 31:
        return torch.int32
    raise DressError(f"row size {row_size} needs 64-bit indices")


@dataclass(frozen=True)
class LayerTable:
    name: str
    kind: str  # "conv" | "fc"
    shape: tuple[int, ...]
    counts: tuple[int, ...]  # n_{k,l} for k = 1..K
    has_bias: bool

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def row_size(self) -> int:
        return SparseLayer(self.name, self.kind, self.shape).row_size


@dataclass(frozen=True)
class NormTable:
    name: str
    channels: int
    eps: float
    per_subnet: bool  # (K, C) tensors; otherwise (1, C) shared by all subnets


@dataclass(frozen=True)
class DressTables:
    """The DRESS-CSR tables of one model; see the module docstring for the layout."""

    spec: ArchSpec
    sparsities: tuple[float, ...]
    layers: tuple[LayerTable, ...]
    norms: tuple[NormTable, ...]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    source_hash: str

    @property
    def num_subnets(self) -> int:
        return len(self.sparsities)

    def index(self, layer: str) -> torch.Tensor:
        return self.tensors[f"{layer}.index"]

    def value(self, layer: str) -> torch.Tensor:
        return self.tensors[f"{layer}.value"]

    def bias(self, layer: str) -> torch.Tensor | None:
        return self.tensors.get(f"{layer}.bias")

    def norm(self, name: str, key: str, k: int) -> torch.Tensor:
        """Subnet ``k``'s ``"scale"`` or ``"shift"`` row of a norm layer (a view)."""
        table = next(n for n in self.norms if n.name == name)
        return self.tensors[f"{name}.{key}"][k if table.per_subnet else 0]

    @property
    def allocation(self) -> Allocation:
        return Allocation(
            sparsities=self.sparsities,
            layers=tuple(t.name for t in self.layers),
            rows=tuple(t.rows for t in self.layers),
            row_sizes=tuple(t.row_size for t in self.layers),
            counts=tuple(tuple(t.counts[k] for t in self.layers) for k in range(self.num_subnets)),
        )

    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "arch": json.loads(self.spec.to_json()),
            "sparsities": list(self.sparsities),
            "source_hash": self.source_hash,
            "layers": [
                {"name": t.name, "kind": t.kind, "shape": list(t.shape), "counts": list(t.counts),
                 "bias": t.has_bias}
                for t in self.layers
            ],
            "norms": [
                {"name": n.name, "channels": n.channels, "eps": n.eps, "per_subnet": n.per_subnet}
                for n in self.norms
            ],
        }  # fmt: skip


def template_model(spec: ArchSpec) -> torch.nn.Module:
    """The module structure of ``spec`` on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):  # shapes and module types only; nothing is allocated
        return build_model(spec)


def build_dress_tables(
    state_dict: StateDict,
    spec: ArchSpec,
    sparsities: Sequence[float],
    *,
    allocation: Allocation | None = None,
    allocation_mode: str = "global",
    norm_states: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> DressTables:
    """Deterministic DRESS-CSR tables of ``state_dict`` (a model of ``spec``).

    ``allocation`` fixes the layer-wise counts (e.g. the one DRESS training ended with, or the
    one carried by the previous tables); without it they are allocated from these weights
    (:func:`allocate_sparsity` with ``allocation_mode``). ``norm_states`` are the K per-subnet
    norm states from §3.3.5; without them the norms in ``state_dict`` are shared.
    Everything runs on CPU with stable sorts and integer arithmetic, so a server and a device
    that hold the same weights build bit-identical tables.
    """
    s = check_sparsities(sparsities)
    template = template_model(spec)
    expected = template.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise DressError(
            f"state does not match {spec.kind} spec: missing {missing}, unexpected {unexpected}"
        )
    for key, ref in expected.items():
        if tuple(state_dict[key].shape) != tuple(ref.shape):
            raise DressError(
                f"{key} has shape {tuple(state_dict[key].shape)}, spec needs {tuple(ref.shape)}"
            )
    layers = sparse_layers(template)
    weights = {
        layer.name: state_dict[f"{layer.name}.weight"].detach().to("cpu") for layer in layers
    }
    for name, w in weights.items():
        if not w.is_floating_point():
            raise DressError(f"{name}.weight must be floating point, got {w.dtype}")
    if allocation is None:
        costs = layer_costs(template, spec.input_shape) if allocation_mode == "latency" else None
        allocation = allocate_sparsity(weights, s, allocation_mode, costs=costs)
    else:
        _check_allocation_fits(allocation, layers, s)
    tensors: dict[str, torch.Tensor] = {}
    tables = []
    for li, layer in enumerate(layers):
        rows = as_rows(weights[layer.name])
        counts = tuple(c[li] for c in allocation.counts)
        top = row_order(rows)[:, : counts[0]]  # (G, n_1) most important columns first
        tensors[f"{layer.name}.index"] = top.to(index_dtype(layer.row_size))
        tensors[f"{layer.name}.value"] = rows.gather(1, top)
        bias_key = f"{layer.name}.bias"
        if bias_key in state_dict:
            tensors[bias_key] = state_dict[bias_key].detach().to("cpu").contiguous().clone()
        tables.append(
            LayerTable(layer.name, layer.kind, layer.shape, counts, bias_key in state_dict)
        )
    norms = []
    modules = norm_layers(template)
    if norm_states is not None and len(norm_states) != len(s):
        raise DressError(f"got {len(norm_states)} norm states for {len(s)} subnets")
    for name, module in modules.items():
        sources = norm_states if norm_states is not None else [state_dict]
        scales, shifts = [], []
        for src in sources:
            try:
                w, b, mean, var = (src[f"{name}.{key}"].detach().to("cpu") for key in NORM_STATE)
            except KeyError as exc:
                raise DressError(f"norm state lacks {exc.args[0]!r}") from exc
            scale, shift = fold_norm(w, b, mean, var, float(module.eps))
            scales.append(scale)
            shifts.append(shift)
        tensors[f"{name}.scale"] = torch.stack(scales).contiguous()
        tensors[f"{name}.shift"] = torch.stack(shifts).contiguous()
        norms.append(
            NormTable(name, int(module.num_features), float(module.eps), norm_states is not None)
        )
    result = DressTables(spec, s, tuple(tables), tuple(norms), tensors, model_hash(spec, state_dict))
    validate_tables(result)
    return result


def fold_norm(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``scale * z + shift`` (float32 ops in a fixed order: deterministic)."""
    if (var < 0).any() or not all(torch.isfinite(t).all() for t in (weight, bias, mean, var)):
        raise DressError("norm statistics must be finite with non-negative variance")
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _check_allocation_fits(
    alloc: Allocation, layers: list[SparseLayer], s: tuple[float, ...]
) -> None:
    check_allocation(alloc)
    if alloc.sparsities != s:
        raise DressError(f"allocation is for sparsities {list(alloc.sparsities)}, not {list(s)}")
    got = [(n, g, r) for n, g, r in zip(alloc.layers, alloc.rows, alloc.row_sizes, strict=True)]
    want = [(layer.name, layer.rows, layer.row_size) for layer in layers]
    if got != want:
        raise DressError(f"allocation layers {got} do not match the model's {want}")


def validate_tables(tables: DressTables) -> None:
    """Check every format invariant; raises :class:`DressError` naming the first violation.

    Layer tensors have shape ``(G, n_1)`` and the right dtypes, counts nest and realise the
    sparsities, each row's indices are distinct and in range, and each row is in importance order
    (``|value|`` non-increasing, equal magnitudes by ascending index).
    """
    check_allocation(tables.allocation)
    template = template_model(tables.spec)
    want = [(layer.name, layer.kind, layer.shape) for layer in sparse_layers(template)]
    got = [(t.name, t.kind, t.shape) for t in tables.layers]
    if got != want:
        raise DressError(f"tables describe layers {got}, the spec has {want}")
    expected_keys = set()
    for t in tables.layers:
        idx, val = tables.tensors.get(f"{t.name}.index"), tables.tensors.get(f"{t.name}.value")
        if idx is None or val is None:
            raise DressError(f"layer {t.name!r} lacks its index or value table")
        shape = (t.rows, t.counts[0])
        if tuple(idx.shape) != shape or tuple(val.shape) != shape:
            raise DressError(
                f"layer {t.name!r}: tables must be {shape}, "
                f"got {tuple(idx.shape)} and {tuple(val.shape)}"
            )
        if idx.dtype != index_dtype(t.row_size) or not val.is_floating_point():
            raise DressError(f"layer {t.name!r}: bad dtypes {idx.dtype}, {val.dtype}")
        if not torch.isfinite(val).all():
            raise DressError(f"layer {t.name!r}: values contain NaN or infinity")
        cols = idx.to(torch.int64)
        if cols.min() < 0 or cols.max() >= t.row_size:
            raise DressError(f"layer {t.name!r}: column index outside [0, {t.row_size})")
        if t.counts[0] > 1:
            srt = cols.sort(dim=1).values
            if (srt[:, 1:] == srt[:, :-1]).any():
                raise DressError(f"layer {t.name!r}: a row repeats a column index")
            mag = val.abs()
            worse = mag[:, 1:] > mag[:, :-1]
            tie_wrong = (mag[:, 1:] == mag[:, :-1]) & (cols[:, 1:] < cols[:, :-1])
            if (worse | tie_wrong).any():
                raise DressError(f"layer {t.name!r}: a row is not in importance order")
        expected_keys |= {f"{t.name}.index", f"{t.name}.value"}
        if t.has_bias:
            b = tables.tensors.get(f"{t.name}.bias")
            if b is None or tuple(b.shape) != (t.rows,):
                raise DressError(f"layer {t.name!r}: bias must have shape ({t.rows},)")
            expected_keys.add(f"{t.name}.bias")
    template_norms = {n: int(m.num_features) for n, m in norm_layers(template).items()}
    if {n.name: n.channels for n in tables.norms} != template_norms:
        raise DressError(f"tables' norm layers differ from the spec's {template_norms}")
    for n in tables.norms:
        rows = tables.num_subnets if n.per_subnet else 1
        for key in NORM_KEYS:
            nt = tables.tensors.get(f"{n.name}.{key}")
            if nt is None or tuple(nt.shape) != (rows, n.channels) or not nt.is_floating_point():
                raise DressError(
                    f"norm {n.name!r}: {key} must be a float ({rows}, {n.channels}) tensor"
                )
            if not torch.isfinite(nt).all():
                raise DressError(f"norm {n.name!r}: {key} contains NaN or infinity")
            expected_keys.add(f"{n.name}.{key}")
        if not n.eps > 0:
            raise DressError(f"norm {n.name!r}: eps must be positive, got {n.eps}")
    extra = sorted(set(tables.tensors) - expected_keys)
    if extra:
        raise DressError(f"tables hold unexpected tensors {extra}")


def subnet_tables(tables: DressTables, k: int) -> DressTables:
    """The tables of subnet ``k`` alone (K = 1), e.g. to price one subnet on its own."""
    _check_k(tables, k)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for t in tables.layers:
        count = t.counts[k]
        tensors[f"{t.name}.index"] = tables.index(t.name)[:, :count].contiguous()
        tensors[f"{t.name}.value"] = tables.value(t.name)[:, :count].contiguous()
        if (bias := tables.bias(t.name)) is not None:
            tensors[f"{t.name}.bias"] = bias.clone()
        layers.append(LayerTable(t.name, t.kind, t.shape, (count,), t.has_bias))
    for n in tables.norms:
        for key in NORM_KEYS:
            tensors[f"{n.name}.{key}"] = tables.norm(n.name, key, k).unsqueeze(0).clone()
    norms = tuple(NormTable(n.name, n.channels, n.eps, False) for n in tables.norms)
    return DressTables(
        tables.spec, (tables.sparsities[k],), tuple(layers), norms, tensors, tables.source_hash
    )


def subnet_state_dict(tables: DressTables, k: int) -> dict[str, torch.Tensor]:
    """The dense masked state ``w ⊙ m_k`` (+ subnet ``k``'s norms) for ``build_model(spec)``."""
    _check_k(tables, k)
    state: dict[str, torch.Tensor] = {}
    for t in tables.layers:
        count = t.counts[k]
        val = tables.value(t.name)
        dense = torch.zeros(t.rows, t.row_size, dtype=val.dtype)
        dense.scatter_(1, tables.index(t.name)[:, :count].to(torch.int64), val[:, :count])
        state[f"{t.name}.weight"] = dense.view(t.shape)
        if (bias := tables.bias(t.name)) is not None:
            state[f"{t.name}.bias"] = bias.clone()
    for n in tables.norms:
        # The folded norm as a BN layer: mean 0 and var 1 - eps give (z - 0) / sqrt(1) exactly
        # in float32 for the usual eps, so the layer computes scale * z + shift.
        scale = tables.norm(n.name, "scale", k)
        state[f"{n.name}.weight"] = scale.clone()
        state[f"{n.name}.bias"] = tables.norm(n.name, "shift", k).clone()
        state[f"{n.name}.running_mean"] = torch.zeros_like(scale)
        state[f"{n.name}.running_var"] = torch.full_like(scale, 1.0 - n.eps)
        state[f"{n.name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return state


def _check_k(tables: DressTables, k: int) -> None:
    if not 0 <= k < tables.num_subnets:
        raise DressError(f"subnet {k} out of range [0, {tables.num_subnets})")
