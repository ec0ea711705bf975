"""Row-based unstructured sampling of nested subnets (thesis §3.3.2, §3.3.4, Alg. 3.2).

Importance is weight magnitude. Within a row, weights are ordered by ``|w|`` descending, ties
broken by column index ascending (a stable sort), so the order is a pure function of the bits of
``w``. Subnet ``k`` keeps the first ``n_{k,l}`` weights of every row of layer ``l``; because
``n_{1,l} >= n_{2,l} >= ...``, masks are nested (Eq. 3.3) by construction and every row of a
layer holds exactly the same number of nonzeros.

The per-layer counts (the layer-wise sparsity ``s_{k,l}``) come from a global magnitude ordering
over all sparse layers (§3.3.2): the ``(1 - s_k) * I`` largest weights are picked and each
layer's share is rounded to a whole number of weights per row (:func:`allocate_sparsity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from typing import Any

import torch

from shared.dress.layers import DressError, as_rows

# Thesis §3.4.1 uses 0.5/0.8/0.9/0.95 for ResNet50 and MobileNets; our CNN and MLP are similarly
# over-parametrised for 28x28 inputs, so they get the same levels.
DEFAULT_SPARSITIES: dict[str, tuple[float, ...]] = {
    "cnn": (0.5, 0.8, 0.9, 0.95),
    "mlp": (0.5, 0.8, 0.9, 0.95),
}
DEFAULT_GAMMA = 0.5  # Eq. 3.6 correction factor; §3.4.2.4 recommends [0.5, 1] and uses 0.5


def default_sparsities(kind: str) -> tuple[float, ...]:
    if kind not in DEFAULT_SPARSITIES:
        raise DressError(f"no default sparsities for model kind {kind!r}")
    return DEFAULT_SPARSITIES[kind]


def check_sparsities(sparsities: Sequence[float]) -> tuple[float, ...]:
    """``0 <= s_1 < s_2 < ... < s_K < 1`` (Eq. 3.1's ordering); returns them as a tuple.

    ``s_1 = 0`` is allowed and gives the dense backbone as the first subnet.
    """
    s = tuple(float(v) for v in sparsities)
    if not s:
        raise DressError("need at least one sparsity level")
    if any(not math.isfinite(v) or v < 0.0 or v >= 1.0 for v in s):
        raise DressError(f"sparsities must lie in [0, 1), got {list(s)}")
    if any(b <= a for a, b in pairwise(s)):
        raise DressError(f"sparsities must be strictly increasing, got {list(s)}")
    return s


def loss_weights(sparsities: Sequence[float], gamma: float = DEFAULT_GAMMA) -> list[float]:
    """Eq. 3.6-3.7: ``pi_k = (1 - s_k)^gamma / sum_j (1 - s_j)^gamma``."""
    s = check_sparsities(sparsities)
    if not math.isfinite(gamma):
        raise DressError(f"gamma must be finite, got {gamma}")
    alpha = [(1.0 - v) ** gamma for v in s]
    total = sum(alpha)
    return [a / total for a in alpha]


def row_order(weight: torch.Tensor) -> torch.Tensor:
    """Alg. 3.2 line 5: column indices of each row by ``|w|`` descending, ties by index.

    Returns an int64 ``(G, N)`` tensor. ``torch.sort(stable=True)`` keeps equal keys in index
    order, which makes the result deterministic across machines (tested against numpy).
    """
    rows = as_rows(weight.detach())
    if rows.is_floating_point() and not torch.isfinite(rows).all():
        raise DressError("weights contain NaN or infinity; cannot rank them by magnitude")
    return torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices


def row_ranks(weight: torch.Tensor) -> torch.Tensor:
    """Rank (0 = most important) of every weight within its row, as int32 ``(G, N)``.

    Subnet ``k``'s mask of a layer is then just ``ranks < n_{k,l}``.
    """
    order = row_order(weight)
    ranks = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    positions = torch.arange(order.shape[1], dtype=torch.int32, device=order.device)
    return ranks.scatter_(1, order, positions.expand_as(order).contiguous())


def row_masks(weight: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Alg. 3.2: boolean masks ``(K, *weight.shape)``; mask ``k`` keeps the top ``counts[k]``
    weights of every row. ``counts`` must be non-increasing (nested masks, Eq. 3.3)."""
    n_cols = as_rows(weight).shape[1]
    _check_counts(counts, n_cols, "row_masks")
    ranks = row_ranks(weight)
    n = torch.tensor(list(counts), dtype=torch.int32, device=ranks.device).view(-1, 1, 1)
    return (ranks.unsqueeze(0) < n).reshape(len(counts), *weight.shape)


def _check_counts(counts: Sequence[int], row_size: int, where: str) -> None:
    if not counts:
        raise DressError(f"{where}: need at least one count")
    if any(int(c) != c or c < 0 or c > row_size for c in counts):
        raise DressError(f"{where}: counts must be integers in [0, {row_size}], got {list(counts)}")
    if any(b > a for a, b in pairwise(counts)):
        raise DressError(
            f"{where}: counts must be non-increasing for nested masks, got {list(counts)}"
        )


def check_masks(masks: torch.Tensor, counts: Sequence[int]) -> None:
    """Validate Eq. 3.3 (``m_i ⊙ m_j = m_j`` for ``i < j``) and equal per-row counts.

    ``masks`` is ``(K, G, *)`` boolean; raises :class:`DressError` naming the first violation.
    """
    if masks.dtype != torch.bool or masks.dim() < 3 or masks.shape[0] != len(counts):
        raise DressError(
            f"masks must be bool (K={len(counts)}, G, ...), got {masks.dtype} {tuple(masks.shape)}"
        )
    rows = masks.reshape(masks.shape[0], masks.shape[1], -1)
    for k in range(1, rows.shape[0]):
        if (rows[k] & ~rows[k - 1]).any():
            raise DressError(f"mask {k} keeps weights that mask {k - 1} drops (not nested)")
    per_row = rows.sum(dim=2)
    for k, c in enumerate(counts):
        bad = (per_row[k] != c).nonzero()
        if len(bad):
            g = int(bad[0, 0])
            raise DressError(f"mask {k} row {g} has {int(per_row[k, g])} nonzeros, expected {c}")


@dataclass(frozen=True)
class Allocation:
    """Layer-wise sparsity of every subnet: ``counts[k][l]`` nonzeros in each row of layer ``l``.

    ``layers``/``rows``/``row_sizes`` describe the sparse layers in model order.
    """

    sparsities: tuple[float, ...]
    layers: tuple[str, ...]
    rows: tuple[int, ...]
    row_sizes: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]

    @property
    def num_subnets(self) -> int:
        return len(self.sparsities)

    @property
    def total_weights(self) -> int:  # I in Eq. 3.2
        return sum(g * n for g, n in zip(self.rows, self.row_sizes, strict=True))

    def layer_counts(self, layer: str) -> tuple[int, ...]:
        """``(n_{1,l}, ..., n_{K,l})`` for one layer."""
        li = self.layers.index(layer)
        return tuple(c[li] for c in self.counts)

    def nnz(self, k: int) -> int:
        return sum(g * n for g, n in zip(self.rows, self.counts[k], strict=True))

    def realised_sparsity(self, k: int) -> float:
        return 1.0 - self.nnz(k) / self.total_weights

    def tolerance(self) -> float:
        """Bound on ``|realised - s_k|``: half the largest row count over ``I`` (see
        :func:`allocate_sparsity`: a whole row-count step is the finest adjustment)."""
        return max(self.rows) / (2.0 * self.total_weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparsities": list(self.sparsities),
            "layers": list(self.layers),
            "rows": list(self.rows),
            "row_sizes": list(self.row_sizes),
            "counts": [list(c) for c in self.counts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Allocation:
        try:
            alloc = cls(
                sparsities=tuple(float(v) for v in data["sparsities"]),
                layers=tuple(str(v) for v in data["layers"]),
                rows=tuple(int(v) for v in data["rows"]),
                row_sizes=tuple(int(v) for v in data["row_sizes"]),
                counts=tuple(tuple(int(v) for v in c) for c in data["counts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DressError(f"malformed allocation: {exc!r}") from exc
        check_allocation(alloc)
        return alloc


def check_allocation(alloc: Allocation) -> None:
    """Nested per-layer counts in ``[1, N_l]`` and overall sparsity ``s_k`` within tolerance."""
    s = check_sparsities(alloc.sparsities)
    n_layers = len(alloc.layers)
    if not n_layers or len(alloc.rows) != n_layers or len(alloc.row_sizes) != n_layers:
        raise DressError(f"allocation has {n_layers} layers but {len(alloc.rows)} row counts")
    if len(alloc.counts) != len(s) or any(len(c) != n_layers for c in alloc.counts):
        raise DressError(f"allocation counts must be {len(s)} x {n_layers}")
    for li, name in enumerate(alloc.layers):
        per_k = [c[li] for c in alloc.counts]
        if per_k[-1] < 1:
            raise DressError(
                f"layer {name!r}: every row must keep at least one weight, got {per_k}"
            )
        _check_counts(per_k, alloc.row_sizes[li], f"layer {name!r}")
    tol = alloc.tolerance()
    for k, target in enumerate(s):
        got = alloc.realised_sparsity(k)
        if abs(got - target) > tol + 1e-12:
            raise DressError(
                f"subnet {k}: realised sparsity {got:.6f} differs from s_k={target} by more "
                f"than {tol:.2e}"
            )


ALLOCATION_MODES = ("global", "uniform", "latency")


def allocate_sparsity(
    weights: Mapping[str, torch.Tensor],
    sparsities: Sequence[float],
    mode: str = "global",
    *,
    costs: Mapping[str, float] | None = None,
) -> Allocation:
    """Layer-wise sparsity from the global magnitude ordering (§3.3.2, Alg. 3.1 line 2/17).

    For each ``s_k`` the ``T_k = round((1 - s_k) * I)`` largest ``|w|`` over all layers (``weights``
    in model order, ties by layer then index) give a count ``c_{k,l}`` per layer. Thesis rows
    need a whole number per row, so ``n_{k,l} = floor(c_{k,l} / G_l)`` (at least 1 so no neuron is
    cut off, at most ``n_{k-1,l}`` so masks nest) and then single-row-count steps are taken,
    largest remainder first, while they bring ``sum_l G_l n_{k,l}`` strictly closer to
    ``(1 - s_k) I``. At the end no step helps, so ``|nnz_k - (1 - s_k) I| <= G_l / 2`` for every
    adjustable layer: the realised sparsity equals ``s_k`` up to :meth:`Allocation.tolerance`.
    After the (stable) sort everything is integer or IEEE-double arithmetic, so a server and a
    device compute the same allocation from the same weights.

    ``mode="uniform"`` replaces the global ordering by ``c_{k,l} = (1 - s_k) N_l G_l`` (every
    layer equally sparse, as N:M sparsity does) and keeps the same rounding. Not in the thesis:
    global magnitude leaves the cheap-to-store but expensive-to-run early convolutions dense,
    so ``uniform`` trades some accuracy for FLOPs and latency when those matter more.

    ``mode="latency"`` (not in the thesis either) keeps the global ordering but ranks each weight
    by its magnitude per unit of run-time cost, ``|w| / c_l^beta`` with ``beta = 0.5``:
    ``costs[l]`` is what one nonzero of layer ``l`` costs per inference (its output positions,
    i.e. MACs per weight, from :func:`shared.dress.costs.layer_costs`, or a measured time per
    nonzero). A 28x28 conv weight then has to be ``sqrt(784) = 28`` times larger than an fc
    weight to survive, so the expensive early convolutions thin out first. With ``beta = 0.5``
    the key is computed as ``|w|^2 / c_l`` in float64, exact for float32 ``w`` up to one
    rounding, so the order is as reproducible as the global one.
    """
    if mode not in ALLOCATION_MODES:
        raise DressError(f"unknown allocation mode {mode!r}; expected one of {ALLOCATION_MODES}")
    s = check_sparsities(sparsities)
    if not weights:
        raise DressError("allocate_sparsity needs at least one weight tensor")
    names = list(weights)
    mats = [as_rows(weights[n].detach()) for n in names]
    rows = [int(m.shape[0]) for m in mats]
    sizes = [int(m.shape[1]) for m in mats]
    total = sum(g * n for g, n in zip(rows, sizes, strict=True))
    device = mats[0].device
    mags = torch.cat([m.reshape(-1).abs().to(device=device, dtype=torch.float32) for m in mats])
    if not torch.isfinite(mags).all():
        raise DressError("weights contain NaN or infinity; cannot rank them by magnitude")
    if mode == "latency":
        cost_list = _check_costs(names, costs)
    elif costs is not None:
        raise DressError(f"costs only apply to allocation mode 'latency', not {mode!r}")
    if mode in ("global", "latency"):
        order = torch.sort(mags, descending=True, stable=True).indices
        bounds = torch.tensor(
            [g * n for g, n in zip(rows, sizes, strict=True)], device=device
        ).cumsum(0)
        layer_of_rank = torch.bucketize(order, bounds, right=True)  # layer of the i-th largest |w|
    counts: list[tuple[int, ...]] = []
    upper = list(sizes)
    for sk in s:
        target = int(math.floor((1.0 - sk) * total + 0.5))
        if mode in ("global", "latency"):
            per_layer = torch.bincount(layer_of_rank[:target], minlength=len(names)).tolist()
            if mode == "latency":
                caps = [g * c for g, c in zip(rows, upper, strict=True)]
                per_layer = _cost_weighted(per_layer, cost_list, caps, target)
        else:
            per_layer = [
                int(math.floor((1.0 - sk) * g * n + 0.5)) for g, n in zip(rows, sizes, strict=True)
            ]
        n = _round_to_rows(per_layer, rows, upper, (1.0 - sk) * total)
        realised = 1.0 - sum(g * c for g, c in zip(rows, n, strict=True)) / total
        if abs(realised - sk) > max(rows) / (2.0 * total) + 1e-12:
            raise DressError(
                f"cannot realise sparsity {sk} with equal per-row counts (closest {realised:.6f}); "
                f"sparsities {list(s)} are too close together or too extreme for these layers"
            )
        counts.append(tuple(n))
        upper = list(n)
    return Allocation(s, tuple(names), tuple(rows), tuple(sizes), tuple(counts))


def _check_costs(names: list[str], costs: Mapping[str, float] | None) -> list[float]:
    if costs is None or set(costs) != set(names):
        raise DressError(
            f"allocation mode 'latency' needs a cost for each layer {names}, got "
            f"{None if costs is None else sorted(costs)}"
        )
    out = []
    for name in names:
        c = costs[name]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
            raise DressError(f"layer {name!r}: cost must be a positive number, got {c!r}")
        out.append(float(c))
    return out


def _cost_weighted(
    per_layer: list[int], costs: list[float], caps: list[int], target: int
) -> list[int]:
    """Scale the global-magnitude counts by ``cost^-1/2`` and refit them to ``target``.

    Water-filling: ``c'_l = min(cap_l, lam * c_l / sqrt(cost_l))`` with ``lam`` such that the
    counts sum to ``target`` (layers at their cap are fixed and the rest re-scaled). Only IEEE
    double arithmetic and ``sqrt`` (correctly rounded), so every machine gets the same counts.
    """
    weights = [c / math.sqrt(k) for c, k in zip(per_layer, costs, strict=True)]
    capped: set[int] = set()
    while True:
        free = [li for li in range(len(weights)) if li not in capped and weights[li] > 0]
        rest = target - sum(caps[li] for li in capped)
        mass = sum(weights[li] for li in free)
        if not free or mass <= 0 or rest <= 0:
            lam = 0.0
            break
        lam = rest / mass
        over = [li for li in free if lam * weights[li] > caps[li]]
        if not over:
            break
        capped.update(over)
    return [
        caps[li] if li in capped else int(math.floor(lam * weights[li] + 0.5))
        for li in range(len(weights))
    ]


def _round_to_rows(
    per_layer: list[int], rows: list[int], upper: list[int], target: float
) -> list[int]:
    """Whole per-row counts near ``per_layer / rows`` whose total is closest to ``target``
    (the real ``(1 - s) I``; IEEE doubles, so every machine takes the same steps)."""
    n = [min(max(1, c // g), u) for c, g, u in zip(per_layer, rows, upper, strict=True)]
    residual = target - sum(g * c for g, c in zip(rows, n, strict=True))
    # Largest remainder first (exact fractions: no float ties), then by layer order.
    order = sorted(
        range(len(n)), key=lambda li: (-Fraction(per_layer[li] % rows[li], rows[li]), li)
    )
    moved = True
    while moved:
        moved = False
        for li in order:
            g = rows[li]
            if residual > 0 and n[li] < upper[li] and g < 2 * residual:
                n[li] += 1
                residual -= g
                moved = True
            elif residual < 0 and n[li] > 1 and g < -2 * residual:
                n[li] -= 1
                residual += g
                moved = True
    return n
