"""Meta attention (thesis §4.4.3): channel scores from x_{l-1} and g(y_l), sparsified by Alg. 4.1.

A module h(w; t) (Eq. 4.11/4.12; Fig. 4.3) average-pools t (B, C, H, W) over space, divides each
sample's pooled vector by the RMS of that sample's whole tensor, applies one Linear C -> C, averages the result over the batch
(Fig. 4.3: softmax inputs are batch-averaged, because g(w_l) has no batch dimension), and takes
the softmax, which Alg. 4.1 clips and renormalises into γ (mean 1 over the kept channels' sum).

Deviation: the RMS scaling is ours. g(y_l) is tiny and its scale depends on how the loss is
divided over gradient-accumulation batches; without it the backward scores would be nearly
constant (softmax of the bias) and would change with the sample batch size. (Dividing by the
whole tensor's RMS rather than the pooled vector's keeps the near-zero channel means of a
normalised input, e.g. one channel per group, from being blown up into rounding noise.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def clip_and_renormalise(pi: torch.Tensor, rho: float) -> torch.Tensor:
    """Alg. 4.1 on a softmax output ``pi`` (C,): zero the smallest entries whose mass first
    reaches ``rho``, renormalise, rescale by C. Straight-through backward (§4.4.3.1): the
    gradient is that of ``pi / sum(pi) * C``, the map without the clipping step."""
    c = pi.numel()
    soft = pi / pi.sum().clamp_min(_EPS) * c
    if rho <= 0.0:  # line 3: "if rho = 0, do nothing"
        return soft
    with torch.no_grad():
        sorted_pi, order = torch.sort(pi.detach(), stable=True)  # line 1, ascending
        cum = torch.cumsum(sorted_pi, 0)
        drop = min(int((cum < rho).sum()) + 1, c)  # line 2: smallest c with cumsum >= rho
        kept = pi.detach().clone()
        kept[order[:drop]] = 0.0  # line 3
        total = kept.sum()
        hard = kept / total * c if total > 0 else kept  # lines 4-5 (rho = 1: all zero)
    return soft + (hard - soft).detach()


def attention_logits(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch-averaged softmax input of h(w; t): (B, C, ...) -> (C,)."""
    pooled = t.flatten(2).mean(2) if t.dim() > 2 else t  # (B, C)
    rms = t.flatten(1).pow(2).mean(1, keepdim=True).add(_EPS).sqrt()  # of the whole sample
    return F.linear(pooled / rms, weight, bias).mean(0)  # (C,)


def attention_score(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rho: float) -> torch.Tensor:
    """γ^fw (Eq. 4.11, t = x_{l-1}) or γ^bw (Eq. 4.12, t = g(y_l)): a (C,) sparse score."""
    return clip_and_renormalise(torch.softmax(attention_logits(t, weight, bias), 0), rho)


def weight_mask(kind: str, gamma_fw: torch.Tensor, gamma_bw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """γ_l of Eq. 4.13 shaped for the layer's weight, and the bias's mask (γ^bw: a bias gradient
    needs no input channel)."""
    if kind == "conv":  # γ_{b a 1 1} = γ^fw_a γ^bw_b
        return gamma_bw.view(-1, 1, 1, 1) * gamma_fw.view(1, -1, 1, 1), gamma_bw
    return gamma_fw * gamma_bw, gamma_bw  # norm: per-channel scale and shift
