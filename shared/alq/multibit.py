"""Multi-bit weights ŵ_g = B_g α_g (thesis Eq. 2.9) and their initialisation (Alg. 2.1).

A :class:`MultiBit` holds all groups of one tensor at once, padded to ``K = I_max`` bases:
``B`` is ``(G, K, n)`` of ±1, ``alpha`` ``(G, K)`` and ``active`` ``(G, K)`` marks the bases a
group still has (pruning in the α domain clears them). Inactive coordinates are kept at 0, so
``reconstruct`` never needs the mask, and a group with no active basis is all zeros (I_g = 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from shared.alq.groups import check_structure, from_groups, to_groups


@dataclass
class MultiBit:
    structure: str
    shape: tuple[int, ...]
    B: torch.Tensor  # (G, K, n) float, entries ±1
    alpha: torch.Tensor  # (G, K) float, 0 where inactive, >= 0 where active
    active: torch.Tensor  # (G, K) bool

    @property
    def groups(self) -> int:
        return int(self.B.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.B.shape[2])

    @property
    def widths(self) -> torch.Tensor:
        """I_g per group."""
        return self.active.sum(dim=1)

    @property
    def numel(self) -> int:
        return self.groups * self.group_size

    def average_bits(self) -> float:
        """Σ_g I_g n_g / Σ_g n_g: bits of binary bases per weight (coordinates not counted)."""
        return float(self.widths.sum()) / max(1, self.groups)

    def grouped(self) -> torch.Tensor:
        """ŵ as ``(G, n)``: Σ_i α_i β_i per group (Eq. 2.9 / 2.17)."""
        return torch.bmm((self.alpha * self.active).unsqueeze(1), self.B).squeeze(1)

    def reconstruct(self) -> torch.Tensor:
        """ŵ in the tensor's own shape."""
        return from_groups(self.grouped(), self.structure, self.shape)

    def canonicalise(self) -> None:
        """Keep α ≥ 0 by negating the basis of a negative coordinate (§2.4.3, after Eq. 2.23),
        and inactive coordinates at exactly 0 with basis +1."""
        neg = self.alpha < 0
        self.alpha = torch.where(neg, -self.alpha, self.alpha) * self.active
        self.B = torch.where(neg.unsqueeze(-1), -self.B, self.B)
        self.B = torch.where(self.active.unsqueeze(-1), self.B, torch.ones_like(self.B))


def masked_lstsq(B: torch.Tensor, target: torch.Tensor, active: torch.Tensor,
                 H: torch.Tensor | None = None, lam: float = 0.0) -> torch.Tensor:
    """Per group, the coordinates α (zero where inactive) minimising
    ``(B^T α - t)^T H (B^T α - t) + lam |α|^2`` over the active bases: with ``H = I``, ``lam = 0``
    Alg. 2.1 line 11, α = (B^T B)^-1 B^T w; with AMSGrad's diagonal H, Eq. 2.26.

    Sums in float32, solved in float64; inactive rows/columns are replaced by the identity so one batched solve
    covers groups of every width.
    """
    t = target.float()
    Hf = torch.ones_like(t) if H is None else H.float()
    m = active.double()
    BH = B.float() * Hf.unsqueeze(1)  # products in float32 (±1 times H), the small solve in float64
    A = torch.bmm(BH, B.float().transpose(1, 2)).double() * m.unsqueeze(2) * m.unsqueeze(1)
    eye = torch.eye(B.shape[1], dtype=torch.float64).expand_as(A)
    A = A + eye * (lam * m + (1.0 - m)).unsqueeze(2)
    rhs = torch.bmm(BH, t.unsqueeze(-1)).squeeze(-1).double() * m
    sol = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    return (sol * m).to(B.dtype)


def sketch(w: torch.Tensor, structure: str, i_max: int, sigma: float = 0.0) -> MultiBit:
    """Structured sketching (Alg. 2.1): per group, add bases β_i = sign(ε) of the residual and
    refit α by least squares until the residual is small or ``i_max`` bases are used.

    Deviation: the stopping test is ``|ε|^2 > sigma * |w_g|^2`` (relative to the group's own
    energy) instead of the thesis's ``|ε ⊙ w_g|^2 > σ``, which depends on the weights' scale;
    ``sigma = 0`` always uses ``i_max`` bases (up to an exact fit). sign(0) is +1.
    """
    check_structure(structure, tuple(w.shape))
    if not 1 <= i_max <= 8:
        raise ValueError(f"i_max must lie in [1, 8], got {i_max}")
    W = to_groups(w.detach().float(), structure)
    G, n = W.shape
    B = torch.ones(G, i_max, n)
    alpha = torch.zeros(G, i_max)
    active = torch.zeros(G, i_max, dtype=torch.bool)
    energy = (W**2).sum(1)
    eps = W.clone()
    for i in range(i_max):
        grow = ((eps**2).sum(1) > sigma * energy) & (energy > 0) & ((eps**2).sum(1) > 0)
        if not bool(grow.any()):
            break
        beta = torch.where(eps >= 0, 1.0, -1.0)
        B[grow, i] = beta[grow]
        active[grow, i] = True
        alpha = masked_lstsq(B, W, active)
        eps = W - torch.bmm(alpha.unsqueeze(1), B).squeeze(1)
    mb = MultiBit(structure, tuple(w.shape), B, alpha, active)
    mb.canonicalise()
    return mb


@functools.lru_cache(maxsize=16)
def _codes(K: int) -> torch.Tensor:
    """All 2^K sign vectors, code c's bit i (MSB first) = 1 ↔ +1."""
    c = torch.arange(2**K).unsqueeze(1)
    bits = (c >> torch.arange(K - 1, -1, -1).unsqueeze(0)) & 1
    return bits.float() * 2 - 1


def nearest_codes(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2.21/2.22: for every weight j of every group, the b ∈ {±1}^K minimising
    |b^T α_g - target_j|, by sorting the 2^K values b^T α_g (Eq. 2.22) once per group and
    a binary search per weight (O(n log 2^K) instead of the exhaustive O(n 2^K)).

    ``alpha`` ``(G, K)`` (inactive entries 0), ``target`` ``(G, n)``; returns ``(G, K, n)`` ±1.
    """
    G, K = alpha.shape
    codes = _codes(K)  # (2^K, K)
    values = alpha.float() @ codes.T  # (G, 2^K)
    sorted_v, order = values.sort(dim=1, stable=True)
    t = target.float().contiguous()
    hi = torch.searchsorted(sorted_v.contiguous(), t).clamp(max=2**K - 1)
    lo = (hi - 1).clamp(min=0)
    v_hi, v_lo = sorted_v.gather(1, hi), sorted_v.gather(1, lo)
    pick = torch.where((t - v_lo).abs() <= (v_hi - t).abs(), lo, hi)
    idx = order.gather(1, pick)  # (G, n) code index
    return codes[idx].transpose(1, 2).contiguous().to(alpha.dtype)  # (G, K, n)
