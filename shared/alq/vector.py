"""Multi-bit coding of a plain vector under a bit budget: the ``alq`` value format of
``shared.codec`` (docs/diff-format.md §6), numpy only.

The vector (a sparse update's values, in index order) is cut into consecutive groups of
``group`` values (the last one may be shorter). Each group gets I_g ∈ [0, max_bits] binary
bases and non-negative fp16 coordinates by structured sketching (Alg. 2.1): the sketch of
width i+1 extends that of width i, so one pass gives every group's reconstruction error
e_g(i) for all widths. The widths are then chosen to minimise Σ_g e_g(I_g) subject to the
total encoded bits (bases, coordinates and width nibbles) staying within ``avg_bits`` per
value: a Lagrangian sweep, min_I e_g(I) + λ·cost(I) with λ bisected to the budget.

Deviation from ALQ: no loss is available to a codec, so the α-domain pruning of Alg. 2.2 uses
the reconstruction error (H = I, g = 0 in Eq. 2.15, with the α refit) instead of the loss
increment; the server's error-feedback residual carries what the coding loses into the next
round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BITS = 8  # widths are 4-bit nibbles; 8 bases of ±α cover more than fp16 resolution
ALPHA_BITS = 16
WIDTH_BITS = 4


@dataclass(frozen=True)
class AlqCode:
    """One coded vector: ``widths`` (G,) u8, ``alphas`` (Σ I_g,) float16 > 0, ``signs``
    (Σ_g I_g n_g,) bool in group order, then basis order, then element order (True = +α)."""

    n: int
    group: int
    widths: np.ndarray
    alphas: np.ndarray
    signs: np.ndarray

    def nbytes(self) -> int:
        return (len(self.widths) + 1) // 2 + 2 * len(self.alphas) + (len(self.signs) + 7) // 8


def group_sizes(n: int, group: int) -> np.ndarray:
    G = -(-n // group)
    sizes = np.full(G, group, dtype=np.int64)
    if G:
        sizes[-1] = n - (G - 1) * group
    return sizes


def decode_values(code: AlqCode) -> np.ndarray:
    """float32 values: per element, Σ_i (±α_i) added in basis order, each add one float32
    rounding (so any IEEE-754 decoder gets the same bits)."""
    sizes = group_sizes(code.n, code.group)
    out = np.zeros(code.n, dtype=np.float32)
    if code.n == 0:
        return out
    widths = code.widths.astype(np.int64)
    gid = np.repeat(np.arange(len(sizes)), sizes)
    pos = np.arange(code.n) - (np.cumsum(sizes) - sizes)[gid]
    a_off = (np.cumsum(widths) - widths)[gid]
    s_off = (np.cumsum(widths * sizes) - widths * sizes)[gid]
    w_elem, size_elem = widths[gid], sizes[gid]
    for i in range(int(widths.max())):
        m = w_elem > i
        a = code.alphas[a_off[m] + i].astype(np.float32)
        sgn = code.signs[s_off[m] + i * size_elem[m] + pos[m]]
        out[m] = out[m] + np.where(sgn, a, -a)
    return out


def _sketches(x: np.ndarray, group: int, max_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded groups X (G, n), and for each width i = 1..max_bits the sketch of width i:
    alphas (max_bits, G, max_bits) and signs (max_bits, G, max_bits, n); padding weights 0."""
    G = -(-len(x) // group)
    flat = np.zeros(G * group, dtype=np.float64)
    flat[: len(x)] = x
    X = flat.reshape(G, group)
    valid = (np.arange(G * group) < len(x)).reshape(G, group).astype(np.float64)
    B = np.ones((G, max_bits, group))
    alphas = np.zeros((max_bits, G, max_bits))
    signs = np.ones((max_bits, G, max_bits, group), dtype=bool)
    eps = X.copy()
    for i in range(max_bits):
        B[:, i] = np.where(eps >= 0, 1.0, -1.0)
        Bi = B[:, : i + 1]
        A = np.einsum("gkn,gn,gjn->gkj", Bi, valid, Bi)
        A += 1e-12 * np.eye(i + 1)  # exact fits repeat a basis; keep the system solvable
        rhs = np.einsum("gkn,gn->gk", Bi, valid * X)
        a = np.linalg.solve(A, rhs[..., None])[..., 0]
        eps = (X - np.einsum("gkn,gk->gn", Bi, a)) * valid
        alphas[i, :, : i + 1] = a
        signs[i, :, : i + 1] = Bi > 0
    return X, alphas, signs


def _finalise(alpha: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical bases of one group: α > 0 in fp16 (negative → flipped basis; bases whose α
    rounds to 0 in fp16 are dropped)."""
    a16 = np.abs(alpha).astype(np.float16)
    s = np.where((alpha < 0)[:, None], ~sign, sign)
    keep = a16 > 0
    return a16[keep], s[keep]


def encode_values(x: np.ndarray, group: int, max_bits: int, avg_bits: float) -> AlqCode | None:
    """The coding of float vector ``x`` with at most ``avg_bits`` encoded bits per value
    (everything: bases, fp16 coordinates, width nibbles), or None when ``x`` is not finite or
    a coordinate overflows fp16 (the caller ships such values raw)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not 1 <= group <= 65535 or not 1 <= max_bits <= MAX_BITS or avg_bits < 0:
        raise ValueError(f"bad alq parameters group={group} max_bits={max_bits} avg_bits={avg_bits}")
    if not np.isfinite(x).all():
        return None
    n = len(x)
    sizes = group_sizes(n, group)
    G = len(sizes)
    if n == 0:
        return AlqCode(0, group, np.zeros(0, np.uint8), np.zeros(0, np.float16), np.zeros(0, bool))
    X, alphas, signs = _sketches(x, group, max_bits)
    if np.abs(alphas).max(initial=0.0) > 65504:
        return None
    # err[g, i] for width i = 0..max_bits (as fp16 coordinates would give, close enough to pick)
    err = np.zeros((G, max_bits + 1))
    err[:, 0] = (X**2).sum(1)
    valid = (np.arange(G * group) < n).reshape(G, group)
    for i in range(max_bits):
        a = alphas[i, :, : i + 1].astype(np.float16).astype(np.float64)
        rec = np.einsum("gkn,gk->gn", np.where(signs[i, :, : i + 1], 1.0, -1.0), a)
        err[:, i + 1] = (((X - rec) * valid) ** 2).sum(1)
    err = np.minimum.accumulate(err, axis=1)  # a wider sketch never needs to be worse
    widths_grid = np.arange(max_bits + 1)
    cost = widths_grid[None, :] * (sizes[:, None] + ALPHA_BITS)  # bits of width i per group
    budget = avg_bits * n - WIDTH_BITS * G

    def pick(lam: float) -> np.ndarray:
        return np.argmin(err + lam * cost, axis=1)

    lo, hi = 0.0, float(err[:, 0].max() + 1.0)
    if (cost[np.arange(G), pick(hi)]).sum() > budget:
        widths = np.zeros(G, dtype=np.int64)  # not even one basis fits: send nothing
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if cost[np.arange(G), pick(mid)].sum() > budget:
                lo = mid
            else:
                hi = mid
        widths = pick(hi)
    out_w, out_a, out_s = [], [], []
    for g in range(G):
        w = int(widths[g])
        if w == 0:
            out_w.append(0)
            continue
        a, s = _finalise(alphas[w - 1, g, :w], signs[w - 1, g, :w, : sizes[g]])
        out_w.append(len(a))
        out_a.append(a)
        out_s.append(s.reshape(-1))
    return AlqCode(
        n, group, np.array(out_w, dtype=np.uint8),
        np.concatenate(out_a) if out_a else np.zeros(0, np.float16),
        np.concatenate(out_s) if out_s else np.zeros(0, bool),
    )  # fmt: skip
